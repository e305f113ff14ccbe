"""A GPT-2-format byte-level BPE tokenizer (encoder.json + vocab.bpe) trained with `tokenizers`.

The files are read by gpt-2-simple's own encoder (and by the server through llama.cpp, from the GGUF export), so they
follow OpenAI's layout: encoder.json maps token -> id with every one of the 256 byte symbols present
(any text encodes), vocab.bpe is '#version: 0.2' then one merge per line, and `<|endoftext|>` is the
last id, as 50256 is in GPT-2.
"""
import json
import os
import tempfile

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

END_OF_TEXT = "<|endoftext|>"


def train_tokenizer(text, vocab_size, out_dir):
    """Train on `text`, write encoder.json and vocab.bpe into out_dir; return the vocabulary size reached."""
    tokenizer = Tokenizer(models.BPE())
    # GPT-2's pre-tokenizer: its regex split, bytes mapped to printable unicode, no prefix space.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - 1,  # one id is kept for <|endoftext|>
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([text], trainer=trainer)

    with tempfile.TemporaryDirectory() as tmp:
        vocab_path, merges_path = tokenizer.model.save(tmp)
        with open(vocab_path, encoding="utf-8") as f:
            vocab = json.load(f)
        with open(merges_path, encoding="utf-8") as f:
            merges = f.read()
    encoder = dict(sorted(vocab.items(), key=lambda item: item[1]))
    assert list(encoder.values()) == list(range(len(encoder))), "tokenizers returned non-contiguous ids"
    encoder[END_OF_TEXT] = len(encoder)
    if not merges.endswith("\n"):  # gpt-2-simple drops the last line of vocab.bpe
        merges += "\n"

    with open(os.path.join(out_dir, "encoder.json"), "w", encoding="utf-8") as f:
        json.dump(encoder, f, ensure_ascii=False)
    with open(os.path.join(out_dir, "vocab.bpe"), "w", encoding="utf-8") as f:
        f.write(merges)
    return len(encoder)
