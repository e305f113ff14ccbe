"""GPT-2 byte-level BPE: a run's encoder.json + vocab.bpe, as its GGUF export carries them.

Encoding and decoding use llama.cpp's tokenizer on the vocabulary the model file already holds
(app/llama_engine.py), which gives the same ids as gpt-2-simple's Encoder (GPT-2's split regex, no
prefix space, no special tokens: "<|endoftext|>" in a prompt is encoded as ordinary pieces; tests
compare the two). A second BPE of our own would cost the cold start 0.1-0.2 s and the process
25 MB (measured with the `tokenizers` library on the 124M vocabulary). Each id's bytes are looked up
once, when first decoded, so a stream of ids can be turned into text incrementally (see TextDecoder).
"""
import codecs
import json
from pathlib import Path

from app.llama_engine import LlamaModel

END_OF_TEXT = "<|endoftext|>"


class Tokenizer:
    def __init__(self, run_dir, n_vocab=None):
        """ValueError when encoder.json is corrupt, or has ids outside the model's 0..n_vocab-1 (the
        export no longer matches the run's files). `model` is the run's LlamaModel, whose vocabulary
        encodes and decodes: set it once loaded, else the first use reads the run's GGUF vocabulary."""
        run_dir = Path(run_dir)
        encoder = json.loads((run_dir / "encoder.json").read_text(encoding="utf-8"))
        if not isinstance(encoder, dict) or not encoder:
            raise ValueError("encoder.json is not a JSON object of tokens")
        for piece, i in encoder.items():
            if type(i) is not int or i < 0 or (n_vocab is not None and i >= n_vocab):
                raise ValueError(f"encoder.json gives {piece!r} the id {i!r}, outside the model's vocabulary "
                                 f"(n_vocab {n_vocab})")
        self.n_vocab = max(encoder.values()) + 1
        self.end_token = encoder.get(END_OF_TEXT)
        self.run_dir = run_dir
        self.model = None
        self._bytes = {}  # id -> bytes, filled as ids are decoded

    def _vocabulary(self):
        if self.model is None:
            weights = self.run_dir / "weights"
            self.model = LlamaModel(weights / json.loads((weights / "manifest.json").read_text())["gguf"], None, 0, 0)
        return self.model

    def encode(self, text):
        return self._vocabulary().tokenize(text)

    def token_bytes(self, token_id):
        """The bytes `token_id` stands for; b"" for an id outside the vocabulary."""
        piece = self._bytes.get(token_id)
        if piece is None:
            piece = self._bytes[token_id] = (self._vocabulary().piece(token_id) if 0 <= token_id < self.n_vocab
                                             else b"")
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

    def flush(self):
        return self._utf8.decode(b"", final=True)
