"""GPT-2 for the server: the exported GGUF model run by llama.cpp (app/llama_engine.py), with its
tokenizer (app/tokenizer.py) and its samplers, set up to sample as gpt-2-simple does (temperature,
then top_p or top_k). No TensorFlow or NumPy here.
"""
import array
import bisect
import hashlib
import json
import math
import os
import re
import secrets
import threading
import time
from pathlib import Path

from app.llama_engine import LlamaError, LlamaModel, Sampler
from app.steering import Steps, controls
from app.tokenizer import END_OF_TEXT, START_OF_TEXT, TextDecoder, Tokenizer

EXPORT_COMMAND = "python -m finetune.export {}"
MODEL_DIR = os.environ.get("MODEL_DIR", "checkpoint/run1")  # the run folder the server serves
MAX_NSAMPLES = 4  # rows of the preallocated key/value cache


class ModelError(Exception):
    """The model folder can't be served; the message says why and what fixes it."""


# ---------------------------------------------------------------- loading


def threads():
    """llama.cpp's threads: $THREADS, default 1 (Cloud Run's --cpu=1); see app/llama_engine.py."""
    value = os.environ.get("THREADS", "1")
    if not (value.isascii() and value.isdigit() and 0 < int(value) <= 256):
        raise ModelError(f"THREADS must be a whole number from 1 to 256, got {value!r}")
    return int(value)


def latest_checkpoint(run_dir):
    """Basename of the latest checkpoint named by TensorFlow's `checkpoint` file, e.g. 'model-200'."""
    state = run_dir / "checkpoint"
    if not state.is_file():
        raise ModelError(f"{run_dir} has no `checkpoint` file: it is not a gpt-2-simple run folder")
    try:
        text = state.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ModelError(f"{state} is not text: the checkpoint is corrupt") from None
    match = re.search(r'^model_checkpoint_path:\s*"(.+)"\s*$', text, re.M)
    if not match:
        raise ModelError(f"{state} names no model_checkpoint_path: the checkpoint is corrupt")
    return Path(match.group(1)).name


def best_checkpoint(run_dir):
    """The checkpoint training kept for its lowest validation loss (best.json), which the export is
    made from when there is one; else None."""
    try:
        return Path(json.loads((run_dir / "best.json").read_text(encoding="utf-8"))["checkpoint"]).name
    except (OSError, ValueError, KeyError, TypeError):
        return None


def check_export(run_dir, hparams):
    """The manifest of RUN_DIR/weights, if it matches the latest or the best checkpoint; else ModelError."""
    fix = f"run `{EXPORT_COMMAND.format(run_dir)}`"
    manifest_path = run_dir / "weights" / "manifest.json"
    if not manifest_path.is_file():
        raise ModelError(f"{run_dir} has no exported weights ({manifest_path} is missing): {fix}")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        exported, exported_sha = manifest["checkpoint"], manifest["index_sha256"]
    except (ValueError, KeyError, TypeError) as e:
        raise ModelError(f"{manifest_path} is corrupt ({e!r}): {fix}") from None
    latest = latest_checkpoint(run_dir)
    if exported not in (latest, best_checkpoint(run_dir)):
        raise ModelError(f"the exported weights are from {exported} but the latest checkpoint is {latest}: {fix}")
    index = run_dir / f"{exported}.index"
    if not index.is_file():
        raise ModelError(f"{index} is missing: the checkpoint is incomplete")
    if hashlib.sha256(index.read_bytes()).hexdigest() != exported_sha:
        raise ModelError(f"the exported weights do not match {index.name} (it changed since the export): {fix}")
    if manifest.get("hparams", hparams) != hparams:
        raise ModelError(f"the exported weights were made with other hparams than {run_dir}/hparams.json: {fix}")
    gguf = manifest.get("gguf")
    if not (isinstance(gguf, str) and Path(gguf).name == gguf and (run_dir / "weights" / gguf).is_file()):
        raise ModelError(f"{run_dir / 'weights'} has no GGUF model (an export from an older version?): {fix}")
    return manifest


# ---------------------------------------------------------------- the model


class GPT2:
    blocklist = None  # the server's banned phrases (BLOCKLIST_FILE), a steering.Banned: set by app/main.py

    def __init__(self, run_dir):
        run_dir = Path(run_dir)
        if not run_dir.is_dir():
            raise ModelError(f"model folder {run_dir} does not exist (set MODEL_DIR to a gpt-2-simple run folder)")
        for name in ("hparams.json", "encoder.json", "vocab.bpe"):
            if not (run_dir / name).is_file():
                raise ModelError(f"{run_dir / name} is missing: {run_dir} is not a complete gpt-2-simple run folder")
        try:
            hp = json.loads((run_dir / "hparams.json").read_text(encoding="utf-8"))
            self.n_vocab, self.n_ctx, self.n_embd, self.n_head, self.n_layer = (
                hp[k] for k in ("n_vocab", "n_ctx", "n_embd", "n_head", "n_layer"))
        except (ValueError, KeyError, TypeError) as e:
            raise ModelError(f"{run_dir / 'hparams.json'} is corrupt ({e!r})") from None
        for name in ("n_vocab", "n_ctx", "n_embd", "n_head", "n_layer"):  # not 1e999, Infinity, 12.5 or true
            if type(hp[name]) is not int:
                raise ModelError(f"{run_dir / 'hparams.json'} is corrupt: {name} is {hp[name]!r}, not an integer")
        if min(self.n_vocab, self.n_ctx, self.n_embd, self.n_layer) < 1:
            raise ModelError(f"{run_dir / 'hparams.json'} is corrupt: n_vocab, n_ctx, n_embd and n_layer must be "
                             "at least 1")
        # n_head is the one hparam no weight's shape shows: a wrong one would fail every request.
        if self.n_head < 1 or self.n_embd % self.n_head:
            raise ModelError(f"{run_dir / 'hparams.json'} is corrupt: n_embd {self.n_embd} is not a multiple "
                             f"of n_head {self.n_head}")
        self.hparams = hp
        self.manifest = check_export(run_dir, hp)
        fix = f"run `{EXPORT_COMMAND.format(run_dir)}`"
        try:
            self.llama = LlamaModel(run_dir / "weights" / self.manifest["gguf"], self.n_ctx, MAX_NSAMPLES, threads())
        except LlamaError as e:
            raise ModelError(f"{e}: {fix}") from None
        if self.llama.n_vocab != self.n_vocab:
            raise ModelError(f"the exported model has {self.llama.n_vocab} tokens, hparams.json {self.n_vocab}: {fix}")
        self.tokenizer = Tokenizer(run_dir, self.llama)
        if self.llama.piece(self.llama.end_token) != END_OF_TEXT.encode():
            raise ModelError(f"the exported model's end token is not {END_OF_TEXT}: {fix}")
        self.run_dir = run_dir
        # "delimited": trained on <|startoftext|>...<|endoftext|> texts (finetune/text_format.py), which
        # the API's defaults then follow; an export from before that record is "plain".
        self.text_format = self.manifest.get("text_format", "plain")
        # NaN or infinite weights (a diverged run) make NaN logits: refuse them rather than answer "".
        self.llama.prompt([self.llama.end_token])
        if not math.isfinite(sum(array.array("f", self.llama.logits(1)))):  # NaN or inf: the sum is too
            raise ModelError(f"the weights in {run_dir / 'weights'} are not finite (NaN or infinity): the run "
                             "diverged; train again from an earlier checkpoint or with a lower --learning-rate")
        self.lock = threading.Lock()  # one generation at a time: the key/value cache is shared

    def served(self):
        """Which checkpoint is served, its step and validation loss (None when unknown: an export made
        before validation existed), and its texts' format, for /limits and /v1/models."""
        return {"checkpoint": self.manifest["checkpoint"], "step": self.manifest.get("step"),
                "val_loss": self.manifest.get("val_loss"), "text_format": self.text_format}


# ---------------------------------------------------------------- sampling


def samplers(temperature, top_k, top_p, seed, nsamples, steering=None, steps=None, accepted=(),
             top_p_replaces_top_k=True):
    """One sampler a sample, as gpt-2-simple's sample.py filters: divide by temperature, then top_p
    (if > 0) or else top_k (if > 0); llama.cpp's top_p keeps the most likely tokens up to the first
    whose cumulative probability reaches top_p, as gpt-2-simple does. Each sample's generator is seeded
    from the request's seed and the sample's number (a random seed when none is given), so a seed
    gives the same texts again, and seeds 7 and 8 share no sample. steering, steps, accepted: what
    app.steering.controls gives (Sampler's steering arguments; each sample's Steps' arguments; the
    tokens each sampler accepts first). top_p_replaces_top_k=False (OpenAI's API, as vLLM) applies
    top_k, then top_p."""
    if seed is None:
        seed = secrets.randbits(32)
    if top_p > 0 and top_p_replaces_top_k:
        top_k = 0
    chains = []
    for i in range(nsamples):
        chains.append(Sampler(temperature, top_k, top_p, sample_seed(seed, i), **(steering or {}),
                              steps=Steps(**steps) if steps else None))
        chains[-1].accept(accepted)
    return chains


def sample_seed(seed, i):
    digest = hashlib.blake2b(f"{seed} {i}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little") % 0xFFFFFFFF  # 0xFFFFFFFF is llama.cpp's "random seed"


# ---------------------------------------------------------------- text


class SampleText:
    """One sample's text as tokens arrive: decoding, the stop markers, and what may be shown so far.

    As gpt-2-simple's generate(): text = prefix + generated text, cut at `truncate`, prefix dropped
    when include_prefix is false, leading newlines stripped (unless strip_newlines is false: an
    OpenAI completion is exactly what was generated). Unlike gpt-2-simple it stops at the first
    `truncate` (a string, or a list of strings: the first of any) or "<|endoftext|>" in the generated
    text, or when the end token is sampled; and (but in an OpenAI completion) a "<|startoftext|>"
    begins another text: it ends this one, unless nothing but blanks came before it (the model opening
    the text again: dropped, with its tokens).

    The tokens the answer holds (`held`) are those whose text it holds, a stop string cutting the
    rest, and the end token that ended it; each token's offset is where its text starts in the
    generated text (a token that is part of a character: where that character is)."""

    def __init__(self, tokenizer, prefix, include_prefix, truncate, strip_newlines=True):
        self.decoder = TextDecoder(tokenizer)
        self.end_token = tokenizer.end_token
        self.head = prefix if include_prefix else ""
        self.stops = [truncate] if isinstance(truncate, str) else list(truncate or [])
        # An OpenAI completion is exactly what was generated: a <|startoftext|> in it is text.
        texts = [START_OF_TEXT] if strip_newlines else []
        self.markers = [m for m in (*self.stops, END_OF_TEXT, *texts) if m]
        self.strip_newlines = strip_newlines
        self.generated = ""
        self.ids = []  # every sampled token id, in order
        self.offsets, self.ends = [], []  # where each token's text starts and ends in `generated`
        self.scores = []  # each token's log-probabilities (LlamaModel.logprobs), when asked for
        self.stop_reason = None
        self.shown = 0  # characters of text() already handed out
        self.released = 0  # tokens already handed out with a piece

    def add(self, token_id, score=None):
        self.ids.append(token_id)
        if score is not None:
            self.scores.append(score)
        if token_id == self.end_token:
            self.offsets.append(len(self.generated))
            self.stop_reason = "end_token"
        else:
            text, at = self.decoder.add_at(token_id)
            self.offsets.append(len(self.generated) + at)
            self._append(text)
        self.ends.append(len(self.generated))

    def finish(self):
        if self.stop_reason is None:
            self._append(self.decoder.flush())
        if self.stop_reason is None:
            self.stop_reason = "length"

    def _append(self, text):
        """Add decoded text; cut at the first stop marker that ends in it."""
        start = max(0, len(self.generated) - max(map(len, self.markers)) + 1)
        self.generated += text
        while hits := [(i, m) for m in self.markers if (i := self.generated.find(m, start)) >= 0]:
            i, m = min(hits, key=lambda hit: (hit[0], hit[1] not in self.stops))
            if m == START_OF_TEXT and m not in self.stops and not self.generated[:i].strip():  # opened again
                self._drop(i + len(m))
                start = 0
                continue
            self.generated = self.generated[:i]
            self.stop_reason = "truncate" if m in self.stops else "end_token"
            break

    def _drop(self, k):
        """The first k characters are not the answer's: the tokens that start in them go too (offsets < 0)."""
        self.generated = self.generated[k:]
        self.offsets = [o - k for o in self.offsets]
        self.ends = [e - k for e in self.ends]

    def _visible(self):
        """The generated text so far, holding back an ending that could still become a stop marker, and
        blanks alone (a <|startoftext|> after them would drop them)."""
        g = self.generated
        if self.stop_reason is None:
            hold = max((k for m in self.markers for k in range(1, len(m)) if g.endswith(m[:k])), default=0)
            g = g[:len(g) - hold]
            g = g if g.strip() else ""
        return g

    def text(self):
        """The text so far (see _visible)."""
        text = self.head + self._visible()
        return text.lstrip("\n") if self.strip_newlines else text

    def held(self):
        """The tokens the answer holds (see the class), as a range of indices into ids."""
        n = bisect.bisect_left(self.offsets, len(self.generated))
        ended = self.stop_reason == "end_token" and n == len(self.ids) - 1 and self.ids[-1] == self.end_token
        return range(self._first(), n + ended)

    def _first(self):
        return bisect.bisect_left(self.offsets, 0)  # tokens before it were dropped (_drop)

    def new_piece(self):
        """The text after what was handed out, as a Piece whose `tokens` are the range of the tokens
        (indices into ids) whose whole text it completes, or at the end every token held."""
        text = self.text()
        piece = Piece(text[self.shown:])
        if self.stop_reason:
            released = self.held().stop
        else:
            visible = len(self._visible())
            released = min(bisect.bisect_left(self.offsets, visible), bisect.bisect_right(self.ends, visible))
        first = max(self.released, self._first())
        piece.tokens, self.shown, self.released = range(first, max(first, released)), len(text), released
        return piece


class Piece(str):
    """A piece of a sample's text, and the range of its tokens (SampleText.new_piece)."""
    tokens = range(0)


class Generation:
    """One request. Iterating runs the model one token at a time and yields the new text of the
    first sample (a Piece, possibly ""); afterwards `result` holds the answer. The prompt and every
    sample's tokens share the model's n_ctx positions (app.params.prompt_for checks it).

    With `logprobs` (k, 0 to 5) each sampled token gets its log-probabilities (SampleText.scores:
    LlamaModel.logprobs', k likeliest); with `score_prompt`, each prompt token but the first too
    (prompt_scores), the prompt computed in chunks (LlamaModel.score). A length of 0 samples nothing."""

    def __init__(self, model, prompt, *, prefix, length, temperature, top_k, top_p, seed, nsamples,
                 truncate, include_prefix, strip_newlines=True, logprobs=None, score_prompt=False,
                 top_p_replaces_top_k=True, **steering):
        self.model, self.prompt, self.length = model, prompt, length
        # Made when the generation starts, in its worker thread: tokenizing 500 bad_words takes tens of ms,
        # which must not hold the event loop (nor be spent on a request the gate then refuses).
        self.samplers = None
        self.make_samplers = lambda: samplers(temperature, top_k, top_p, seed, nsamples,
                                              *controls(model, prompt, **steering), top_p_replaces_top_k)
        self.samples = [SampleText(model.tokenizer, prefix, include_prefix, truncate, strip_newlines)
                        for _ in range(nsamples)]
        self.logprobs, self.score_prompt = logprobs, score_prompt
        self.prompt_scores = [None]  # the first prompt token has nothing before it to be scored on
        self.stop = threading.Event()  # set when nobody waits for the answer any more (app.gate.steps)
        self.result = None

    def _read_prompt(self, i, output):
        if i + 1 < len(self.prompt):
            self.prompt_scores.append(self.model.llama.logprobs(output, self.prompt[i + 1], self.logprobs or 0))

    def __iter__(self):
        llama, samples, k = self.model.llama, self.samples, self.logprobs
        B, T = len(samples), len(self.prompt)
        with self.model.lock:
            started = time.perf_counter()
            self.samplers = self.samplers or self.make_samplers()
            if self.score_prompt:  # long: it stops between chunks when its client is gone
                if not llama.score(self.prompt, self._read_prompt, self.stop.is_set):
                    return
            else:
                llama.prompt(self.prompt)
            if B > 1:  # same prompt for every sample: computed once, shared
                llama.fork(B)
            outputs = [-1] * B  # every sample draws from the prompt's last logits first
            for step in range(self.length):
                tokens = [llama.sample(sampler, output) for sampler, output in zip(self.samplers, outputs)]
                for s, t, output in zip(samples, tokens, outputs):  # the raw logits: samplers work on copies
                    if s.stop_reason is None:
                        s.add(t, None if k is None else llama.logprobs(output, t, k))
                if all(s.stop_reason for s in samples) or step + 1 == self.length:
                    break
                yield samples[0].new_piece()
                llama.step(tokens, T + step)
                outputs = range(B)
            for s in samples:
                s.finish()
            seconds = time.perf_counter() - started
        yield samples[0].new_piece()
        texts = [s.text() for s in samples]
        self.result = {"text": texts[0], "tokens": sum(len(s.held()) for s in samples),
                       "stop_reason": samples[0].stop_reason, "seconds": round(seconds, 3)}
        if B > 1:
            self.result["texts"] = texts
            self.result["stop_reasons"] = [s.stop_reason for s in samples]

    def run(self):
        for _ in self:
            pass
        return self.result
