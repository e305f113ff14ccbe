"""Fine-tuning GPT-2 with gpt-2-simple: `python -m finetune`, `python -m finetune.export`.

Kept import-free on purpose: `python -m finetune.export` runs in a Docker build stage that has
only numpy and tensorflow.
"""


class UsageError(Exception):
    """A bad input or an unreachable resource: printed as one line, exit status 2, no traceback."""
