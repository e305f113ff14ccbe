"""The generation parameters: defaults, allowed ranges, and parsing from a query string or JSON.

Every rejection is a ParamError whose message names the parameter and what it accepts.
"""
import math
import re

INTEGER = re.compile(r"[+-]?\d{1,19}")
NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")
TRUE, FALSE = ("true", "1"), ("false", "0")


class ParamError(Exception):
    def __init__(self, message, parameter=None, status=400):
        super().__init__(message)
        self.message, self.parameter, self.status = message, parameter, status


class Integer:
    type = "integer"

    def __init__(self, default, low, high):
        self.default, self.low, self.high = default, low, high

    def describe(self):
        return f"an integer from {self.low} to {self.high}"

    def parse(self, value):
        if isinstance(value, str) and INTEGER.fullmatch(value):
            value = int(value)
        if type(value) is not int or not self.low <= value <= self.high:
            return None
        return value

    def limits(self):
        return {"type": self.type, "default": self.default, "min": self.low, "max": self.high}


class Number:
    type = "number"

    def __init__(self, default, low, high):
        self.default, self.low, self.high = default, low, high

    def describe(self):
        return f"a number at least {self.low:g} and at most {self.high:g}"

    def parse(self, value):
        if isinstance(value, str) and NUMBER.fullmatch(value):
            value = float(value)
        if type(value) not in (int, float):
            return None
        try:
            value = float(value)
        except OverflowError:  # an integer too big for a float
            return None
        if not math.isfinite(value):
            return None
        if not self.low <= value <= self.high:
            return None
        return value

    def limits(self):
        return {"type": self.type, "default": self.default, "min": self.low, "max": self.high}


class Boolean:
    type = "boolean"

    def __init__(self, default):
        self.default = default

    def describe(self):
        return "true or false"

    def parse(self, value):
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in TRUE + FALSE:
            return value.lower() in TRUE
        return None

    def limits(self):
        return {"type": self.type, "default": self.default}


class Text:
    type = "string"

    def __init__(self, default, max_chars):
        self.default, self.max_chars = default, max_chars

    def describe(self):
        return f"a string of at most {self.max_chars} characters"

    def parse(self, value):
        if not isinstance(value, str) or len(value) > self.max_chars:
            return None
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate from a JSON "\ud800" escape
            return None
        return value

    def limits(self):
        return {"type": self.type, "default": self.default, "max_chars": self.max_chars}


def parameters(n_ctx, n_vocab, prefix_max_chars=500, max_nsamples=4):
    """The parameter table for a model; order is the documented order."""
    return {
        "length": Integer(100, 1, n_ctx - 1),
        # Near 0, logits / temperature overflows float32 (from about 1e-37); greedy decoding is top_k=1.
        "temperature": Number(0.7, 0.01, 2.0),
        "top_k": Integer(0, 0, n_vocab),
        "top_p": Number(0.0, 0.0, 1.0),
        "prefix": Text("", prefix_max_chars),
        "truncate": Text(None, 100),
        "include_prefix": Boolean(True),
        "seed": Integer(None, 0, 2**32 - 1),
        "nsamples": Integer(1, 1, max_nsamples),
        "stream": Boolean(False),
    }


HINTS = {"temperature": " (for greedy decoding use top_k=1)", "top_k": " (0 turns it off)",
         "top_p": " (0 turns it off)", "seed": " (leave it out for a random one)"}


def parse(table, given):
    """given: a dict of name -> str (query string) or JSON value. Returns every parameter's value."""
    unknown = [name for name in given if name not in table]
    if unknown:
        raise ParamError(f"unknown parameter {unknown[0]!r}; the parameters are {', '.join(table)}", unknown[0])
    values = {}
    for name, spec in table.items():
        value = given.get(name)
        if value is None:  # absent, or JSON null
            values[name] = spec.default
            continue
        parsed = spec.parse(value)
        if parsed is None:
            if isinstance(spec, Text) and isinstance(value, str):
                shown = f"{len(value)} characters"  # not the user's text: it goes to the logs too
            else:
                shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
            raise ParamError(f"{name} must be {spec.describe()}{HINTS.get(name, '')}, got {shown}", name)
        values[name] = parsed
    if values["stream"] and values["nsamples"] > 1:
        raise ParamError("stream=true works with nsamples=1 only", "nsamples")
    if values["truncate"] == "":
        values["truncate"] = None
    return values


def limits(table, **extra):
    """GET /limits: every parameter's type, default and range, plus model facts."""
    return {**{name: spec.limits() for name, spec in table.items()}, **extra}
