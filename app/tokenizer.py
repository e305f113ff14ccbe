"""GPT-2 byte-level BPE, read from a run's encoder.json + vocab.bpe.

Encoding uses the `tokenizers` library (Rust), set up to match gpt-2-simple's Encoder exactly:
GPT-2's split regex, no prefix space, and no special tokens ("<|endoftext|>" in a prompt is
encoded as ordinary pieces, as gpt-2-simple does). Decoding maps each id to its bytes, so a
stream of ids can be turned into text incrementally (see TextDecoder).
"""
import codecs
import json
from functools import lru_cache
from pathlib import Path

END_OF_TEXT = "<|endoftext|>"


@lru_cache()
def bytes_to_unicode():
    """GPT-2's reversible byte <-> printable-character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


class Tokenizer:
    def __init__(self, run_dir, n_vocab=None):
        """ValueError when the files are corrupt, or encoder.json has ids outside the model's 0..n_vocab-1
        (checked before anything is sized by them)."""
        from tokenizers import Tokenizer as HFTokenizer, models, pre_tokenizers

        run_dir = Path(run_dir)
        encoder = json.loads((run_dir / "encoder.json").read_text(encoding="utf-8"))
        if not isinstance(encoder, dict) or not encoder:
            raise ValueError("encoder.json is not a JSON object of tokens")
        for piece, i in encoder.items():
            if type(i) is not int or i < 0 or (n_vocab is not None and i >= n_vocab):
                raise ValueError(f"encoder.json gives {piece!r} the id {i!r}, outside the model's vocabulary "
                                 f"(n_vocab {n_vocab})")
        bpe_data = (run_dir / "vocab.bpe").read_text(encoding="utf-8")
        # Same parsing as gpt-2-simple: the first line is a header, the last one is empty.
        merges = [tuple(line.split()) for line in bpe_data.split("\n")[1:-1]]
        self._tok = HFTokenizer(models.BPE(vocab=encoder, merges=merges))
        self._tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)

        # Each piece's characters stand for bytes: map them back to chars 0-255, then to bytes.
        to_bytes = {ord(c): b for b, c in bytes_to_unicode().items()}
        self.n_vocab = max(encoder.values()) + 1
        self.token_bytes = [b""] * self.n_vocab
        for piece, i in encoder.items():
            self.token_bytes[i] = piece.translate(to_bytes).encode("latin-1")
        self.end_token = encoder.get(END_OF_TEXT)

    def encode(self, text):
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids):
        return b"".join(self.token_bytes[i] for i in ids).decode("utf-8", errors="replace")


class TextDecoder:
    """Turns token ids into text one at a time; a character split across tokens waits for its end."""

    def __init__(self, tokenizer):
        self._bytes = tokenizer.token_bytes
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, token_id):
        return self._utf8.decode(self._bytes[token_id] if token_id < len(self._bytes) else b"")

    def flush(self):
        return self._utf8.decode(b"", final=True)
