"""Build a randomly initialised GPT-2 run folder in gpt-2-simple's layout, for the benchmark.

    python bench/make_model.py OUT_DIR                 # the GPT-2 124M shape
    python bench/make_model.py OUT_DIR --n-layer 2 --n-embd 64 --n-head 2 --n-vocab 1000

Pretrained weights cannot be downloaded here, and speed and memory do not depend on the values,
so the model is gpt-2-simple's own graph (gpt_2_simple.src.model) with its random initialisers,
saved with tf.compat.v1.train.Saver like a fine-tuning run. The tokenizer is a real GPT-2-format
byte-level BPE (encoder.json + vocab.bpe, `<|endoftext|>` as the last id) trained with `tokenizers`
on a generated corpus rich enough to reach exactly n_vocab entries. The folder is then exported with
`python -m finetune.export` (GGUF, Q8_0), as the server needs. A finished folder is reused when its spec matches.
"""
import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # finetune.tokenizer, when run as a script
SHAPE_124M = {"n_vocab": 50257, "n_ctx": 1024, "n_embd": 768, "n_head": 12, "n_layer": 12}
END_TOKEN = "<|endoftext|>"
SPEC_FILE = "bench_model.json"  # written last: its presence means the folder is complete


def make_corpus(path, n_words, seed):
    """Pseudo-language text: syllable words with Zipf-like frequencies, punctuation, digits and some
    non-ASCII, so BPE keeps finding new pairs to merge until the vocabulary is full."""
    rng = random.Random(seed)
    onsets = ["", "b", "c", "d", "f", "g", "h", "j", "k", "l", "m", "n", "p", "qu", "r", "s", "t", "v",
              "w", "z", "br", "ch", "cl", "dr", "fl", "gr", "pl", "pr", "sh", "st", "str", "th", "tr", "é", "ß"]
    nuclei = ["a", "e", "i", "o", "u", "y", "ai", "ea", "ee", "ie", "oo", "ou", "ä", "ö", "ü"]
    codas = ["", "", "", "n", "r", "s", "t", "l", "m", "ck", "nd", "ng", "rt", "st", "x"]
    lexicon = set()
    while len(lexicon) < 150_000:
        n = rng.choice([1, 1, 2, 2, 2, 3, 3, 4])
        lexicon.add("".join(rng.choice(onsets) + rng.choice(nuclei) + rng.choice(codas) for _ in range(n)))
    lexicon = sorted(lexicon)
    rng.shuffle(lexicon)
    weights = [1.0 / (rank + 10) for rank in range(len(lexicon))]
    punct = [".", ",", "!", "?", ";", ":", " -", "'s", "\n"]
    with open(path, "w", encoding="utf-8") as f:
        for words in iter(lambda: rng.choices(lexicon, weights, k=10_000), None):
            out = []
            for w in words:
                r = rng.random()
                if r < 0.08:
                    w = w.capitalize()
                elif r < 0.10:
                    w = str(rng.randint(0, 99999))
                elif r < 0.11:
                    w = w.upper()
                out.append(w + (rng.choice(punct) if rng.random() < 0.12 else ""))
            f.write(" ".join(out) + "\n")
            n_words -= len(words)
            if n_words <= 0:
                break


def train_tokenizer(run_dir, n_vocab, seed):
    """encoder.json + vocab.bpe with exactly n_vocab entries, `<|endoftext|>` last (as GPT-2),
    made by the same trainer as `python -m finetune --from-scratch`."""
    from finetune.tokenizer import train_tokenizer as train

    n_words = 3_000_000 if n_vocab > 5000 else 100_000
    with tempfile.TemporaryDirectory() as tmp:
        corpus = os.path.join(tmp, "corpus.txt")
        make_corpus(corpus, n_words, seed)
        with open(corpus, encoding="utf-8") as f:
            reached = train(f.read(), n_vocab, run_dir)
    if reached != n_vocab:
        raise SystemExit(f"tokenizer reached {reached} entries, not {n_vocab}: corpus too small")


def check_tokenizer(run_dir):
    """gpt-2-simple's encoder must round-trip text with the files just written."""
    from gpt_2_simple.src import encoder

    enc = encoder.get_encoder(str(run_dir))
    for text in ["Hello world, this is a test.", "  spaces\tand\nnewlines ", "émoji 🙂 ünïcödé 123456",
                 "text" + END_TOKEN + "more"]:
        ids = enc.encode(text)
        if enc.decode(ids) != text or max(ids) >= len(enc.encoder):
            raise SystemExit(f"tokenizer does not round-trip {text!r}")


def write_checkpoint(run_dir, hparams, seed):
    """gpt-2-simple's graph with its random initialisers, saved as a run's model-1 checkpoint."""
    import tensorflow as tf
    from gpt_2_simple.src import model

    hp = model.default_hparams()
    hp.override_from_dict(hparams)
    tf.compat.v1.disable_eager_execution()
    tf.compat.v1.set_random_seed(seed)
    context = tf.compat.v1.placeholder(tf.int32, [1, None])
    model.model(hparams=hp, X=context)
    # Relative paths in the `checkpoint` file, so the folder can be built in a temp dir and renamed.
    saver = tf.compat.v1.train.Saver(save_relative_paths=True)
    with tf.compat.v1.Session() as sess:
        sess.run(tf.compat.v1.global_variables_initializer())
        saver.save(sess, str(run_dir / "model"), global_step=1)
    (run_dir / "counter").write_text("1\n")


def build(out_dir, hparams=SHAPE_124M, seed=0):
    """Build (or reuse) the run folder at out_dir; returns its Path."""
    out_dir = Path(out_dir)
    spec = {"hparams": hparams, "seed": seed, "version": 3}  # 3: exported as GGUF
    spec_path = out_dir / SPEC_FILE
    if spec_path.exists() and json.loads(spec_path.read_text()) == spec:
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".tmp-", dir=out_dir.parent))
    tmp.chmod(0o755)
    try:
        (tmp / "hparams.json").write_text(json.dumps(hparams, indent=2) + "\n")
        train_tokenizer(tmp, hparams["n_vocab"], seed)
        check_tokenizer(tmp)
        write_checkpoint(tmp, hparams, seed)
        subprocess.run([sys.executable, "-m", "finetune.export", str(tmp)], cwd=ROOT, check=True)
        spec_path_tmp = tmp / SPEC_FILE
        spec_path_tmp.write_text(json.dumps(spec) + "\n")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out_dir")
    for name, value in SHAPE_124M.items():
        p.add_argument("--" + name.replace("_", "-"), type=int, default=value)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    hparams = {name: getattr(args, name) for name in SHAPE_124M}
    if hparams["n_embd"] % hparams["n_head"]:
        p.error("--n-embd must be a multiple of --n-head")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    print(build(args.out_dir, hparams, args.seed))


if __name__ == "__main__":
    main()
