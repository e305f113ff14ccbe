"""Whether a corpus's texts are delimited by <|startoftext|> ... <|endoftext|> (gpt-2-simple's
format, what data.extract writes) or plain, and the run folder's record of it (corpus.json).

A model trained on delimited texts has learned that a text begins after <|startoftext|>: the
server and the memorization report start there by default, so that every sample is one whole text.
"""
import json
import os

from finetune.files import atomic_write_text

START, END = "<|startoftext|>", "<|endoftext|>"
DELIMITED, PLAIN = "delimited", "plain"
RECORD = "corpus.json"  # in the run folder: {"text_format", "dataset", "source"}


def detect(text):
    return DELIMITED if START in text else PLAIN


def read(run_dir, dataset=None):
    """The run's text format: its corpus.json's; for a run trained before that record existed, the
    dataset's markers when a dataset is given, else plain."""
    try:
        with open(os.path.join(run_dir, RECORD), encoding="utf-8") as f:
            recorded = json.load(f).get("text_format")
        if recorded in (DELIMITED, PLAIN):
            return recorded
    except (OSError, ValueError, AttributeError):
        pass
    if dataset and os.path.isfile(dataset) and not dataset.endswith(".npz"):
        with open(dataset, encoding="utf-8", errors="replace") as f:
            return detect(f.read())
    return PLAIN


def write(run_dir, dataset_path, text):
    """Write RUN/corpus.json for the corpus at dataset_path: its format (text is the corpus's text,
    None for a .npz: plain), its base name, and the content of DATASET.meta.json (the query
    data.extract wrote it with) when that file exists and is JSON, else null."""
    dataset_path, source = os.path.normpath(dataset_path), None
    try:
        with open(dataset_path + ".meta.json", encoding="utf-8") as f:
            source = json.load(f)
    except (OSError, ValueError):
        pass
    record = {"text_format": PLAIN if text is None else detect(text),
              "dataset": os.path.basename(dataset_path), "source": source}
    atomic_write_text(os.path.join(run_dir, RECORD), json.dumps(record, indent=1) + "\n")
