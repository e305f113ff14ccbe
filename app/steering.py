"""Sampling controls beyond gpt-2-simple's, the same on every protocol: repetition, frequency and presence
penalties, logit_bias, min_p, and banned words (a request's bad_words and the server's BLOCKLIST_FILE).
`controls` turns a request's values into what app/llama_engine.py's Sampler takes: llama.cpp's own
logit-bias and min-p samplers, and Steps, which applies the penalties and bans banned phrases of several
tokens at each step.

The penalties are llama.cpp's (and Hugging Face's and OpenAI's) arithmetic, done here: llama.cpp's
penalties sampler looks up every token of the vocabulary at every step (50,257 hash lookups: two thirds
more time in the sampler chain at the 124M shape, docs/benchmarks.md), while only the window's tokens
change. They look at a window of the last WINDOW tokens, the prompt's included (its last tokens count
from the first draw on), but not the <|endoftext|> a prompt without prefix starts from.

A banned word or phrase is banned in each of its spellings (`spellings`): as written, in lower case, in
upper case, with a capital first letter and with every word capitalised, each with and without a
leading space. Each spelling is tokenized as the model's tokenizer spells it on its own; a spelling of
one token is never drawn (a logit bias that bans it), one of several tokens cannot be completed: its
last token is banned at a step whose preceding tokens (the prompt's included) are the rest of it.
"""
import collections
import functools

from app.llama_engine import BAN

WINDOW = 64  # the penalties' window of recent tokens (llama.cpp's and llama-server's default)


class BlocklistError(Exception):
    """BLOCKLIST_FILE cannot be read, or holds no phrase."""


def blocklist(environ):
    """BLOCKLIST_FILE's words and phrases, one a line (UTF-8; blank lines skipped); [] without the
    setting. Raises BlocklistError."""
    path = environ.get("BLOCKLIST_FILE")
    if not path:
        return []
    try:
        with open(path, encoding="utf-8-sig") as f:  # a byte-order mark (Windows' editors) is not a word
            phrases = [line.strip() for line in f]
    except (OSError, UnicodeDecodeError) as e:
        raise BlocklistError(f"BLOCKLIST_FILE {path!r} cannot be read: {e}") from None
    if not any(phrases):
        raise BlocklistError(f"BLOCKLIST_FILE {path!r} has no word or phrase (one a line)")
    return [p for p in phrases if p]


def spellings(phrase):
    """The spellings of a banned word or phrase that are banned (see the module's docstring)."""
    lower = phrase.lower()
    cased = [phrase, lower, phrase.upper(), lower[:1].upper() + lower[1:],
             " ".join(word[:1].upper() + word[1:] for word in lower.split(" "))]
    return list(dict.fromkeys(space + text for text in cased for space in ("", " ")))


class Banned:
    """Banned phrases, tokenized: `tokens`, the spellings of one token; `endings`, for those of several,
    the token that would complete one, keyed by the token before it: {that token: [(the tokens before
    the last, the last)]}; `longest`, the most tokens of one spelling."""

    def __init__(self, phrases, tokenizer):
        self.tokens, self.endings, self.longest = set(), collections.defaultdict(list), 1
        every = [spelling for phrase in dict.fromkeys(phrases) for spelling in spellings(phrase)]
        for ids in map(tuple, tokenizer.encode_each(every)):
            if len(ids) == 1:
                self.tokens.add(ids[0])
            elif ids:
                self.endings[ids[-2]].append((ids[:-1], ids[-1]))
                self.longest = max(self.longest, len(ids))

    def __bool__(self):
        return bool(self.tokens or self.endings)


@functools.lru_cache(maxsize=16)  # a client may send the same list with every request
def banned_phrases(phrases, tokenizer):
    """Banned(phrases, tokenizer) for a tuple of phrases, set up once for the last 16 lists."""
    return Banned(phrases, tokenizer)


class Steps:
    """One sample's controls that change at each step, applied to the logits in the chain (Sampler's
    `steps`): banned phrases' last tokens (`banned`, Banned with endings) and the penalties
    (`penalties`: repetition, frequency, presence). `accept` each token as it comes, the prompt's first."""

    def __init__(self, banned=(), penalties=None):
        self.banned_by, self.penalties = [b for b in banned if b.endings], penalties
        longest = max([b.longest for b in self.banned_by], default=1)
        self.recent = collections.deque(maxlen=max(longest - 1, WINDOW if penalties else 0))
        self.counts = collections.Counter()  # of the last WINDOW tokens

    def accept(self, token):
        if self.penalties:
            if len(self.recent) >= WINDOW:
                old = self.recent[-WINDOW]
                self.counts[old] -= 1
                if not self.counts[old]:
                    del self.counts[old]
            self.counts[token] += 1
        self.recent.append(token)

    def banned(self):
        """The tokens that would complete a banned phrase now."""
        found, recent = [], None
        for banned in self.banned_by if self.recent else ():
            for before, last in banned.endings.get(self.recent[-1], ()):
                recent = recent or tuple(self.recent)
                if recent[-len(before):] == before:
                    found.append(last)
        return found

    def apply(self, logits):
        """logits: Sampler's view of the candidates' logits (get(tokens), set(tokens, logits))."""
        if banned := self.banned():
            logits.set(banned, [BAN] * len(banned))
        if self.penalties:
            repeat, frequency, presence = self.penalties
            tokens = list(self.counts)
            # CTRL's penalty (negative logits multiplied, positive ones divided), as llama.cpp and Hugging
            # Face apply it, then OpenAI's
            logits.set(tokens, [(logit * repeat if logit <= 0 else logit / repeat) - (count * frequency + presence)
                                for logit, count in zip(logits.get(tokens), self.counts.values())])


def controls(model, prompt, *, min_p=0.0, repetition_penalty=1.0, frequency_penalty=0.0, presence_penalty=0.0,
             logit_bias=None, bad_words=None):
    """(Sampler's keyword arguments but `steps`, Steps' arguments or None, the prompt's tokens each sample's
    Steps must accept first) for a request's values; ({}, None, []) when none is on, so that the chain and
    every answer stay what they were without them. The server's blocklist (model.blocklist, a Banned)
    applies to every request."""
    banned = [b for b in (model.blocklist, banned_phrases(tuple(bad_words or ()), model.tokenizer)) if b]
    bias = {token: BAN if value == -100 else value for token, value in (logit_bias or {}).items() if value}
    for b in banned:
        bias.update(dict.fromkeys(b.tokens, BAN))
    if sum(value == BAN for value in bias.values()) >= model.n_vocab:
        del bias[model.tokenizer.end_token]  # every token banned: the sample ends at once instead
    args = {}
    if min_p:
        args["min_p"] = min_p
    if bias:
        args.update(logit_bias=bias, n_vocab=model.n_vocab)
    penalties = (repetition_penalty, frequency_penalty, presence_penalty)
    steps = {"banned": [b for b in banned if b.endings], "penalties": penalties != (1.0, 0.0, 0.0) and penalties}
    if not any(steps.values()):
        return args, None, []
    counted = prompt[1:] if prompt[:1] == [model.tokenizer.end_token] else prompt
    return args, steps, counted[-max([WINDOW] + [b.longest for b in steps["banned"]]):]
