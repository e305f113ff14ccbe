"""python -m finetune.report RUN [--dataset FILE]: what the exported model repeats of its training text.

    python -m finetune.report checkpoint/run1                       # the corpus it was trained on
    python -m finetune.report checkpoint/run1 --dataset corpus.txt --samples 50

Generates --samples samples of --length tokens from RUN/weights (the server's engine and its
default sampling, seeded), finds every span of at least 50 characters that appears word for word in
the corpus (finetune/memorization.py: one pass, bounded memory), measures the export's loss on
the run's held-out windows beside the checkpoint's, and writes RUN/report.json and RUN/report.md.
`python -m finetune` runs it after training. Bad input: one line, exit 2; a model that cannot be
loaded: one line, exit 1.
"""
import argparse
import json
import math
import os
import resource
import sys
import time

import numpy as np

from finetune import UsageError, memorization, text_format
from finetune.arguments import positive_int, seed_number
from finetune.files import atomic_write_text
from finetune.validation import recorded_windows

MIN_CHARS = 50
WARN_CHARS = 100
# A text that is a tenth of the corpus, copied by the model as often as it was seen, is missing from
# all 50 samples 0.9^50 = 0.5% of the time (a quarter of the corpus: 0.75^50 = 6e-7; with 20 samples
# a quarter hides 0.3% of the time, a tenth 12%). Rarer texts need more samples: --samples.
SAMPLES = 50
WARN_SHARE = 0.25  # of the samples carrying a copied span of WARN_CHARS or more
ADVICE = ("train fewer steps (the export is already the best checkpoint by validation loss when there is one: "
          "set --early-stop), or on more text; a lower temperature does not fix it, it makes the most "
          "likely text, the memorized one, likelier")


def generate(model, samples, length, seed, texts_are):
    """Samples as the server writes them by default (its default parameters and, for a run trained
    on <|startoftext|>-delimited texts, whole texts: started after <|startoftext|>, cut at
    <|endoftext|>), and a description of that prompt."""
    from tqdm import tqdm

    from app.engine import Generation
    from app.params import parameters, prompt_for

    table = parameters(model.n_ctx, model.n_vocab, text_format=texts_are)
    defaults = {name: spec.default for name, spec in table.items() if name != "stream"}
    defaults["length"] = min(length, model.n_ctx - 1)  # the prompt takes at least one position
    prompt = prompt_for(model, {**defaults, "length": 1})
    defaults["length"] = min(defaults["length"], model.n_ctx - len(prompt))
    texts = []
    for i in tqdm(range(samples), desc="samples", unit="sample", disable=None):
        generation = Generation(model, prompt, **{**defaults, "seed": seed + i, "nsamples": 1})
        texts.append(generation.run()["text"])
    settings = {**{name: defaults[name] for name in ("temperature", "top_k", "top_p", "length")},
                "prompt_tokens": len(prompt)}
    started = f"{defaults['prefix']} (whole texts, cut at {defaults['truncate']})" if defaults["prefix"] \
        else "<|endoftext|> (no prefix)"
    return texts, settings, started


def interval(hits, n, z=1.96):
    """Wilson's 95% interval for a share of hits in n samples (sound at 0 and n hits too)."""
    if n == 0:
        return None
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [max(0.0, centre - half), min(1.0, centre + half)]


def heldout_loss(model, windows):
    """The export's mean cross-entropy over the held-out windows (as training measures it)."""
    losses = []
    for window in windows:
        model.llama.prompt([int(t) for t in window], all_logits=True)
        logits = np.frombuffer(model.llama.logits(len(window)), np.float32).reshape(len(window), -1)
        logits = logits[:-1].astype(np.float64)
        top = logits.max(axis=1, keepdims=True)
        log_z = top[:, 0] + np.log(np.exp(logits - top).sum(axis=1))
        losses.append(float(np.mean(log_z - logits[np.arange(len(logits)), window[1:]])))
    return float(np.mean(losses))


def make_report(run_dir, dataset=None, samples=SAMPLES, length=200, seed=1):
    """Write RUN/report.json and report.md; return the report."""
    run_dir = os.path.abspath(run_dir)
    if not os.path.isdir(run_dir):
        raise UsageError(f"run folder {run_dir} does not exist")
    dataset = dataset or previous_dataset(run_dir)
    if not dataset:
        raise UsageError(f"{run_dir} has no report naming its corpus: give --dataset FILE")
    if not os.path.exists(dataset):
        raise UsageError(f"dataset {dataset} does not exist: give --dataset FILE")
    if dataset.endswith(".npz"):
        raise UsageError(f"dataset {dataset} is a .npz: the report needs the corpus as text (--dataset FILE)")
    from app.engine import GPT2, ModelError
    try:
        model = GPT2(run_dir)
    except ModelError as e:
        raise ModelUnusable(str(e)) from None
    manifest = model.manifest
    # An export made before the run recorded its text format: the corpus's markers tell.
    texts_are = manifest.get("text_format") or text_format.read(run_dir, dataset)
    windows = recorded_windows(run_dir, model.n_vocab, model.n_ctx)  # checked before the samples' minutes

    started = time.time()
    texts, sampling, prompt = generate(model, samples, length, seed, texts_are)
    generation_seconds = time.time() - started
    print(f"Looking for copied spans in {dataset}")
    spans, index = memorization.find_copies(texts, dataset, MIN_CHARS)
    found = []
    for i, (text, sample_spans) in enumerate(zip(texts, spans)):
        data = text.encode("utf-8")
        found += [{"sample": i + 1, "chars": len(t), "text": t}
                  for t in (data[a:b].decode("utf-8", "ignore") for a, b in sample_spans)]
    found.sort(key=lambda s: -s["chars"])
    longest = [max((len(data.encode()[a:b].decode("utf-8", "ignore")) for a, b in s), default=0)
               for data, s in zip(texts, spans)]
    copied = sum(n >= MIN_CHARS for n in longest)
    share, share_long = copied / len(texts), sum(n >= WARN_CHARS for n in longest) / len(texts)
    empty = [i + 1 for i, text in enumerate(texts) if not text.strip()]

    perplexity = None
    if windows is not None and len(windows):  # none: null, not NaN (report.json stays JSON)
        export_loss = heldout_loss(model, windows)
        checkpoint_loss = manifest.get("val_loss")
        perplexity = {
            "export": math.exp(export_loss), "export_loss": export_loss,
            "checkpoint": math.exp(checkpoint_loss) if checkpoint_loss is not None else None,
            "checkpoint_loss": checkpoint_loss,
            "quant": manifest.get("quant"), "windows": len(windows), "tokens": int(windows.size)}

    low, high = interval(copied, len(texts))
    summary = (f"{copied} of {len(texts)} samples ({share:.0%}, 95% interval {low:.0%}-{high:.0%}) repeat "
               f"{MIN_CHARS}+ characters of the training text word for word"
               + (f"; the longest copied span is {found[0]['chars']} characters" if found else "")
               + (f"; {len(empty)} sample{'s are' if len(empty) > 1 else ' is'} empty" if empty else ""))
    warning = None
    if share_long >= WARN_SHARE:
        warning = (f"the model repeats its training text: {share_long:.0%} of the samples carry a copied span "
                   f"of {WARN_CHARS}+ characters. To fix it: {ADVICE}")
    report = {
        "share_of_samples_with_copied_span": share,  # 0 to 1: samples with a span of MIN_CHARS+ characters
        "share_interval_95": [low, high],  # Wilson's, for the share above
        "share_of_samples_with_copied_span_100": share_long,
        "empty_samples": empty,  # their numbers (1-based): the model ended the text at once
        "summary": summary,
        "warning": warning,
        "longest_spans": found[:10],
        "heldout_perplexity": perplexity,
        "settings": {"samples": len(texts), **sampling, "seed": seed, "prompt": prompt, "text_format": texts_are,
                     "min_chars": MIN_CHARS, "warn_chars": WARN_CHARS, "warn_share": WARN_SHARE,
                     "dataset": os.path.abspath(dataset), "checkpoint": manifest["checkpoint"],
                     "step": manifest.get("step"), "quant": manifest.get("quant")},
        "cost": {"generation_seconds": round(generation_seconds, 2),
                 "search_seconds": round(index["seconds"], 2), "corpus_bytes": index["corpus_bytes"],
                 "index_bytes": index["index_bytes"],
                 "peak_memory_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024},
    }
    atomic_write_text(os.path.join(run_dir, "report.json"), json.dumps(report, indent=1) + "\n")
    atomic_write_text(os.path.join(run_dir, "report.md"), markdown(report, texts))
    return report


def previous_dataset(run_dir):
    try:
        with open(os.path.join(run_dir, "report.json"), encoding="utf-8") as f:
            return json.load(f)["settings"]["dataset"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def markdown(report, texts):
    s, p = report["settings"], report["heldout_perplexity"]
    lines = [f"# Memorization report: {s['checkpoint']} (step {s['step']}, {s['quant']})", "",
             report["summary"] + ".", ""]
    if report["warning"]:
        lines += [f"**Warning: {report['warning']}.**", ""]
    lines += [f"Samples: {s['samples']} x up to {s['length']} tokens, temperature {s['temperature']}, "
              f"top_k {s['top_k']}, top_p {s['top_p']}, seeds {s['seed']} to {s['seed'] + s['samples'] - 1}, "
              f"from {s['prompt']}. Corpus: {s['dataset']} ({report['cost']['corpus_bytes']:,} bytes, searched in "
              f"{report['cost']['search_seconds']} s).", ""]
    if p:
        checkpoint = f"{p['checkpoint']:.2f} (loss {p['checkpoint_loss']:.4f})" if p["checkpoint"] else "unknown"
        lines += ["## Held-out perplexity", "",
                  f"On {p['windows']} held-out windows ({p['tokens']:,} tokens): the export ({p['quant']}) "
                  f"{p['export']:.2f} (loss {p['export_loss']:.4f}), the checkpoint {checkpoint}.", ""]
    lines += ["## Longest copied spans", ""]
    if not report["longest_spans"]:
        lines.append(f"None of {MIN_CHARS}+ characters.")
    for span in report["longest_spans"]:
        quoted = span["text"].replace("\n", " ")
        lines.append(f"- sample {span['sample']}, {span['chars']} characters: \"{quoted}\"")
    lines += ["", "## Samples", ""]
    for i, text in enumerate(texts, 1):
        if i in report["empty_samples"]:
            lines += [f"### {i} (empty: the model ended the text at once)", ""]
        else:
            lines += [f"### {i}", "", "```", text, "```", ""]
    return "\n".join(lines)


class ModelUnusable(Exception):
    """The run's export cannot be loaded (the message says how to fix it)."""


def print_report(report):
    print(f"Memorization: {report['summary']}")
    p = report["heldout_perplexity"]
    if p:
        checkpoint = f"{p['checkpoint']:.2f}" if p["checkpoint"] else "unknown"
        print(f"Held-out perplexity: export ({p['quant']}) {p['export']:.2f}, checkpoint {checkpoint}")
    if report["warning"]:
        print(f"Warning: {report['warning']}")


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage block
        raise UsageError(f"{message} (see python -m finetune.report --help)")


def main(argv=None):
    p = Parser(prog="python -m finetune.report", description=__doc__.split("\n\n")[0],
               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("run_dir", help="the run folder, e.g. checkpoint/run1 (exported)")
    p.add_argument("--dataset", help="the training corpus (default: the one the last report used)")
    p.add_argument("--samples", type=positive_int, default=SAMPLES, help="samples to generate")
    p.add_argument("--length", type=positive_int, default=200, help="tokens per sample (at most n_ctx - 1)")
    p.add_argument("--seed", type=seed_number, default=1, help="seed of the first sample (the others: +1 each)")
    try:
        args = p.parse_args(argv)
        report = make_report(args.run_dir, args.dataset, args.samples, args.length, args.seed)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (ModelUnusable, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print_report(report)
    print(f"Wrote {os.path.join(os.path.abspath(args.run_dir), 'report.md')} and report.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
