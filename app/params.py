"""The generation parameters: defaults, allowed ranges, parsing from a query string or JSON, and the
prompt's check against the model's context.

Every rejection is a ParamError whose message names the parameter and what it accepts.
"""
import json
import math
import re

from app.tokenizer import END_OF_TEXT, START_OF_TEXT

# ASCII digits only: \d (and int(), float()) would take a fullwidth "５" or an Arabic-Indic "٥" as 5.
INTEGER = re.compile(r"[+-]?[0-9]{1,19}")
NUMBER = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?")
TRUE, FALSE = ("true", "1"), ("false", "0")


class ParamError(Exception):
    """message: the answer's; logged: the log's, where the message quotes a field as sent (see app/logs.py)."""

    def __init__(self, message, parameter=None, status=400, logged=None):
        super().__init__(message)
        self.message, self.parameter, self.status, self.logged = message, parameter, status, logged or message


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


def from_json_text(value):
    """A query string's (or a V2 parameter's) value for a list or object parameter: JSON text, parsed; None
    when it is not JSON."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except (ValueError, RecursionError):
        return None


class LogitBias:
    """OpenAI's logit_bias: {token id: bias from -100 to 100}, the id as a JSON key ("50256"); -100 bans the
    token. JSON text in a query string. At most one entry per token of the vocabulary."""
    type = "object"
    default = None

    def __init__(self, n_vocab):
        self.n_vocab = n_vocab

    def describe(self):
        return (f"an object of token ids (0 to {self.n_vocab - 1}) to numbers from -100 to 100 (-100 bans the "
                "token), such as {\"50256\": -100}")

    def parse(self, value):
        value = from_json_text(value)
        if not isinstance(value, dict):
            return None
        bias = {}
        for key, number in value.items():
            key = key if isinstance(key, str) else None
            if not (key and key.isascii() and key.isdigit() and len(key) <= 9 and int(key) < self.n_vocab):
                return None
            if type(number) not in (int, float) or not -100 <= number <= 100:  # NaN fails too
                return None
            bias[int(key)] = float(number)
        return bias

    def limits(self):
        return {"type": self.type, "default": None, "min": -100, "max": 100, "max_items": self.n_vocab}


class Phrases:
    """vLLM's bad_words: a list of words or phrases (app/steering.py says what is banned). JSON text in a
    query string."""
    type = "array"
    default = None

    def __init__(self, max_items, max_chars):
        self.max_items, self.text = max_items, Text(None, max_chars)

    def describe(self):
        return (f"a list of up to {self.max_items} words or phrases of at most {self.text.max_chars} characters "
                "(JSON text in a query string, such as [\"heck\", \"oh no\"])")

    def parse(self, value):
        value = from_json_text(value)
        if not isinstance(value, list) or len(value) > self.max_items:
            return None
        if any(self.text.parse(item) is None for item in value):
            return None
        return [item.strip() for item in value if item.strip()]

    def limits(self):
        return {"type": self.type, "default": None, "max_items": self.max_items, "max_chars": self.text.max_chars}


BAD_WORDS_MAX, BAD_WORD_MAX_CHARS = 500, 100  # what a request may ban (its set-up measured: docs/benchmarks.md)
STEERING = ("min_p", "repetition_penalty", "frequency_penalty", "presence_penalty", "logit_bias", "bad_words")


def steering(n_vocab):
    """The sampling controls beyond gpt-2-simple's (app/steering.py applies them), on every protocol:
    STEERING's names."""
    return {
        "min_p": Number(0.0, 0.0, 1.0),
        # Not near 0: a positive logit divided by it must stay finite in float32 (as for the temperature).
        "repetition_penalty": Number(1.0, 0.01, 2.0),
        "frequency_penalty": Number(0.0, -2.0, 2.0),
        "presence_penalty": Number(0.0, -2.0, 2.0),
        "logit_bias": LogitBias(n_vocab),
        "bad_words": Phrases(BAD_WORDS_MAX, BAD_WORD_MAX_CHARS),
    }


def parameters(n_ctx, n_vocab, prefix_max_chars=500, max_nsamples=4, text_format="plain"):
    """The parameter table for a model; order is the documented order. For a model trained on
    <|startoftext|>...<|endoftext|> texts ("delimited"), the defaults make one whole text: start
    after <|startoftext|>, stop at <|endoftext|>, the marker left out of the answer."""
    whole_texts = text_format == "delimited"
    return {
        "length": Integer(100, 1, n_ctx - 1),
        # Near 0, logits / temperature overflows float32 (from about 1e-37); greedy decoding is top_k=1.
        "temperature": Number(0.7, 0.01, 2.0),
        "top_k": Integer(0, 0, n_vocab),
        "top_p": Number(0.0, 0.0, 1.0),
        "prefix": Text(START_OF_TEXT if whole_texts else "", prefix_max_chars),
        "truncate": Text(END_OF_TEXT if whole_texts else None, 100),
        "include_prefix": Boolean(not whole_texts),
        "seed": Integer(None, 0, 2**32 - 1),
        "nsamples": Integer(1, 1, max_nsamples),
        "stream": Boolean(False),
        **steering(n_vocab),
    }


HINTS = {"temperature": " (for greedy decoding use top_k=1)", "top_k": " (0 turns it off)",
         "top_p": " (0 turns it off)", "seed": " (leave it out for a random one)", "min_p": " (0 turns it off)",
         "repetition_penalty": " (1 turns it off)", "frequency_penalty": " (0 turns it off)",
         "presence_penalty": " (0 turns it off)"}


class Stop:
    """OpenAI's `stop`: a string or a list of up to `max_items` strings; always parsed to a list."""

    def __init__(self, max_chars, max_items=4):
        self.default, self.text, self.max_items = None, Text(None, max_chars), max_items

    def describe(self):
        return f"a string or a list of up to {self.max_items} strings of at most {self.text.max_chars} characters"

    def parse(self, value):
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or len(items) > self.max_items:
            return None
        if any(self.text.parse(item) is None for item in items):
            return None
        return [item for item in items if item]

    def limits(self):
        return {"type": "string or list", "default": None, "max_chars": self.text.max_chars,
                "max_items": self.max_items}


def check(table, given, hints=None):
    """Every parameter of `table`: its default when absent or null, else its parsed value; a ParamError
    names the first one that is wrong and what it accepts. A text parameter's value is never shown
    (the message goes to the log too): only its length or type."""
    values = {}
    for name, spec in table.items():
        value = given.get(name)
        if value is None:  # absent, or JSON null
            values[name] = spec.default
            continue
        parsed = spec.parse(value)
        if parsed is None:
            if isinstance(spec, (Text, Stop, Phrases)) and has_lone_surrogate(value):
                raise ParamError(f"{name} must be a string of whole characters, got a lone surrogate (half of a "
                                 "UTF-16 pair, such as \\ud83d from a cut emoji)", name)
            shown = kind(value) if isinstance(spec, (Text, Stop, Phrases)) else \
                repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
            raise ParamError(f"{name} must be {spec.describe()}{(hints or {}).get(name, '')}, got {shown}", name)
        values[name] = parsed
    return values


def kind(value):
    """What a value is, without its content: for messages and logs that must not show the user's text."""
    if isinstance(value, str):
        return f"{len(value)} characters"
    if isinstance(value, list):
        return f"a list of {len(value)}"
    return {dict: "an object", bool: "a boolean", type(None): "null"}.get(type(value), "a number")


def has_lone_surrogate(value):
    """A string (or a list with one) holding half of a UTF-16 pair, which a JSON \\ud800 escape can give."""
    texts = value if isinstance(value, list) else [value]
    return any(isinstance(t, str) and any("\ud800" <= c <= "\udfff" for c in t) for t in texts)


def parse(table, given):
    """given: a dict of name -> str (query string) or JSON value. Returns every parameter's value."""
    unknown = [name for name in given if name not in table]
    if unknown:
        raise ParamError(f"unknown parameter {unknown[0]!r}; the parameters are {', '.join(table)}", unknown[0])
    values = check(table, given, HINTS)
    if given.get("prefix") is not None and given.get("include_prefix") is None:
        values["include_prefix"] = True  # a prefix of the request's own is in the answer, as gpt-2-simple's
    if values["stream"] and values["nsamples"] > 1:
        raise ParamError("stream=true works with nsamples=1 only", "nsamples")
    if values["truncate"] == "":
        values["truncate"] = None
    return values


def given_prefix(text):
    """V2's and Triton's text_input as a prefix: an empty one is none given, so the model's default start
    applies (a whole text for a delimited run), as for a GET / without a prefix."""
    return {"prefix": text} if text else {}


def prompt_for(model, values, texts=1, ids=None):
    """The prefix as token ids (gpt-2-simple starts from <|endoftext|> without one), or the token ids
    `ids` given instead, checked against n_ctx:
    a request's samples (nsamples) of all its texts (V2 sends several) share n_ctx tokens, each one's
    prefix included, which bounds a request's memory (its share of the key/value cache) and its time."""
    prefix, shares = values["prefix"], values["nsamples"] * texts
    if ids is not None:
        prompt = ids
    elif not prefix:
        prompt = [model.tokenizer.end_token]
    else:
        prompt = model.tokenizer.encode(prefix)
        if model.tokenizer.decode(prompt) != prefix:
            raise ParamError("prefix has characters the model's vocabulary cannot encode", "prefix")
    context = model.n_ctx // shares
    sharing = f"nsamples={values['nsamples']}" if texts == 1 else f"{texts} texts"
    budget = f"{model.n_ctx} tokens (the model's context)" if shares == 1 else \
        f"{context} tokens with {sharing} (the model's context, {model.n_ctx}, shared by the " \
        f"{'samples' if texts == 1 else 'texts'})"
    room = context - len(prompt)
    if room < min(values["length"], 1):  # a length of 0 (scoring the prompt, /v1's echo) may fill the context
        raise ParamError(f"prefix is {len(prompt)} tokens; prefix and length together can be at most {budget}",
                         "prefix")
    if values["length"] > room:
        which = f"the default prefix {prefix} ({len(prompt)} tokens; prefix= for none)" \
            if prefix == START_OF_TEXT else f"this prefix ({len(prompt)} tokens)"
        raise ParamError(f"length must be at most {room} with {which}: prefix and "
                         f"length together can be at most {budget}", "length")
    return prompt


def limits(table, **extra):
    """GET /limits: every parameter's type, default and range, plus model facts."""
    return {**{name: spec.limits() for name, spec in table.items()}, **extra}


# Other clients' names for ours: Triton's vLLM backend and generate examples send max_tokens, Hugging
# Face and MLServer max_new_tokens, and many send stop (a string, or a list of one: the engine stops at one).
ALIASES = {"max_tokens": "length", "max_new_tokens": "length", "stop": "truncate"}


def alias_specs(table):
    """What each alias takes (for the checks and /openapi.json)."""
    return {"max_tokens": table["length"], "max_new_tokens": table["length"],
            "stop": Stop(table["truncate"].max_chars, max_items=1)}


def unalias(table, given):
    """given with the aliases renamed to our names (a stop list to its one string); a value is checked
    under the name it came with, and one parameter given under two names is a ParamError naming both."""
    specs, renamed, came_as = alias_specs(table), {}, {}
    for name, value in given.items():
        target = ALIASES.get(name, name)
        if target in came_as:
            raise ParamError(f"{came_as[target]} and {name} are two names for {target}: give one", name)
        came_as[target] = name
        if name in ALIASES and value is not None:
            value = check({name: specs[name]}, {name: value})[name]
            if name == "stop":
                value = value[0] if value else None
        renamed[target] = value
    return renamed
