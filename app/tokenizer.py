"""GPT-2 byte-level BPE, as the run's GGUF export carries it (from its encoder.json + vocab.bpe).

Encoding and decoding use llama.cpp's tokenizer on the vocabulary the model file already holds
(app/llama_engine.py), which gives the same ids as gpt-2-simple's Encoder (GPT-2's split regex, no
prefix space, no special tokens: "<|endoftext|>" in a prompt is encoded as ordinary pieces; tests
compare the two). The end token is the GGUF's end-of-sequence id. Neither a second BPE of our own
(0.1-0.2 s of a cold start and 25 MB, measured with the `tokenizers` library on the 124M vocabulary)
nor a read of encoder.json (25 ms of CPU holding the GIL, and 10 MB for a moment) is needed. Each
id's bytes are looked up once, when first decoded, so a stream of ids can be turned into text
incrementally (see TextDecoder).
"""
import codecs
import json
import re
from pathlib import Path

from app.llama_engine import LlamaModel

# A text GPT-2's pre-tokenizer splits on its own when it stands between newlines: no newline in it, no
# blank at its end, and at most one space (then no blank) at its start.
JOINABLE = re.compile(r" ?[^\s](?:[^\n]*[^\s])?")

END_OF_TEXT = "<|endoftext|>"
START_OF_TEXT = "<|startoftext|>"  # gpt-2-simple's marker before each text: ordinary pieces to the model


class Tokenizer:
    def __init__(self, run_dir, model=None):
        """`model` is the run's LlamaModel, whose vocabulary encodes and decodes; without one, the first
        use reads the vocabulary of the run's GGUF file (run_dir/weights)."""
        self.run_dir = Path(run_dir)
        self.model = model
        self._bytes = {}  # id -> bytes, filled as ids are decoded

    def _vocabulary(self):
        if self.model is None:
            weights = self.run_dir / "weights"
            self.model = LlamaModel(weights / json.loads((weights / "manifest.json").read_text())["gguf"], None, 0, 0)
        return self.model

    @property
    def end_token(self):
        return self._vocabulary().end_token

    def encode(self, text, special=False):
        return self._vocabulary().tokenize(text, special)

    def encode_each(self, texts):
        """[encode(text) for text in texts], with the JOINABLE ones encoded in one call, joined by newlines:
        a call's own cost is most of a short text's (1,000 banned words' 6,000 spellings: 139 ms one by
        one, 48 ms joined). If the newlines do not split the tokens back into as many texts, one by one."""
        joinable = [text for text in texts if JOINABLE.fullmatch(text)]
        newline, pieces = self.encode("\n"), [[]]
        for token in self.encode("\n".join(joinable)) if joinable and len(newline) == 1 else ():
            if token == newline[0]:
                pieces.append([])
            else:
                pieces[-1].append(token)
        encoded = dict(zip(joinable, pieces)) if len(pieces) == len(joinable) else {}
        return [encoded[text] if text in encoded else self.encode(text) for text in texts]

    def token_bytes(self, token_id):
        """The bytes `token_id` stands for; b"" for an id outside the vocabulary."""
        piece = self._bytes.get(token_id)
        if piece is None:
            model = self._vocabulary()
            piece = self._bytes[token_id] = model.piece(token_id) if 0 <= token_id < model.n_vocab else b""
        return piece

    def decode(self, ids):
        return b"".join(map(self.token_bytes, ids)).decode("utf-8", errors="replace")


class TextDecoder:
    """Turns token ids into text one at a time; a character split across tokens waits for its end."""

    def __init__(self, tokenizer):
        self._bytes = tokenizer.token_bytes
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, token_id):
        return self._utf8.decode(self._bytes(token_id))

    def add_at(self, token_id):
        """add's text, and where in it the token's own text starts: after the replacement characters
        of an unfinished character the token's bytes broke off, if any; at 0 when the token finishes a
        character (or is part of one)."""
        data = self._bytes(token_id)
        text = self._utf8.decode(data)
        try:
            own = data.decode("utf-8")
        except UnicodeDecodeError:
            return text, 0
        return text, len(text) - len(own) if own and text.endswith(own) else 0

    def flush(self):
        return self._utf8.decode(b"", final=True)
