"""Argument types of the finetune commands: argparse names each in its error message."""


def positive_int(text):
    value = int(text)
    if value < 1:
        raise ValueError
    return value


def non_negative_int(text):
    value = int(text)
    if value < 0:
        raise ValueError
    return value


def seed_number(text):
    value = int(text)
    if not 0 <= value < 2**32:  # what NumPy's and gpt-2-simple's seeding accept
        raise ValueError
    return value


def positive_float(text):
    value = float(text)
    if not value > 0 or value == float("inf"):
        raise ValueError
    return value


def fraction(text):
    value = float(text)
    if not 0 <= value <= 0.5:
        raise ValueError
    return value


def gs_url(text):
    if not text.startswith("gs://") or not text[5:].split("/", 1)[0]:
        raise ValueError
    return text.rstrip("/")


# argparse names the type function in its error message; these names read well there.
positive_int.__name__ = "positive integer"
non_negative_int.__name__ = "non-negative integer"
seed_number.__name__ = "seed (0 to 4294967295)"
positive_float.__name__ = "positive number"
gs_url.__name__ = "gs://bucket/prefix URL"
fraction.__name__ = "fraction (0 to 0.5)"
