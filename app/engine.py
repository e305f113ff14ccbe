"""GPT-2 inference in NumPy: the exported weights (memory-mapped .npy), a key/value cache, and
sampling as gpt-2-simple defines it. No TensorFlow here.

The forward pass follows gpt_2_simple/src/model.py line for line; names mirror its variables
(wte, wpe, h<i>/ln_1, attn/c_attn, ...). Weights are float32 and used in place from the mmap:
conv1d weights are [1, nx, nf], so `x @ w[0]` is the layer, and the language-model head is
`x @ wte.T`, a matrix-vector product over wte's contiguous rows (no transposed copy needed).
"""
import hashlib
import json
import math
import mmap
import re
import threading
import time
from pathlib import Path

import numpy as np

from app.tokenizer import END_OF_TEXT, TextDecoder, Tokenizer

EXPORT_COMMAND = "python -m finetune.export {}"
MAX_NSAMPLES = 4  # rows of the preallocated key/value cache


class ModelError(Exception):
    """The model folder can't be served; the message says why and what fixes it."""


# ---------------------------------------------------------------- loading


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


def check_export(run_dir, hparams):
    """The manifest of RUN_DIR/weights, if it matches the latest checkpoint; else ModelError."""
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
    if exported != latest:
        raise ModelError(f"the exported weights are from {exported} but the latest checkpoint is {latest}: {fix}")
    index = run_dir / f"{latest}.index"
    if not index.is_file():
        raise ModelError(f"{index} is missing: the checkpoint is incomplete")
    if hashlib.sha256(index.read_bytes()).hexdigest() != exported_sha:
        raise ModelError(f"the exported weights do not match {index.name} (it changed since the export): {fix}")
    if manifest.get("hparams", hparams) != hparams:
        raise ModelError(f"the exported weights were made with other hparams than {run_dir}/hparams.json: {fix}")
    return manifest


def expected_shapes(hp):
    """Every variable gpt-2-simple's model() creates, with its shape."""
    c, v = hp["n_embd"], hp["n_vocab"]
    shapes = {"model/wte": [v, c], "model/wpe": [hp["n_ctx"], c], "model/ln_f/g": [c], "model/ln_f/b": [c]}
    for i in range(hp["n_layer"]):
        p = f"model/h{i}/"
        shapes.update({
            p + "ln_1/g": [c], p + "ln_1/b": [c], p + "ln_2/g": [c], p + "ln_2/b": [c],
            p + "attn/c_attn/w": [1, c, 3 * c], p + "attn/c_attn/b": [3 * c],
            p + "attn/c_proj/w": [1, c, c], p + "attn/c_proj/b": [c],
            p + "mlp/c_fc/w": [1, c, 4 * c], p + "mlp/c_fc/b": [4 * c],
            p + "mlp/c_proj/w": [1, 4 * c, c], p + "mlp/c_proj/b": [c],
        })
    return shapes


def load_weights(run_dir, hparams):
    weights = {}
    for name, shape in expected_shapes(hparams).items():
        path = run_dir / "weights" / (name.replace("/", ".") + ".npy")
        try:
            # np.asarray drops the np.memmap subclass (its per-operation overhead), keeping the mapping.
            array = np.asarray(np.load(path, mmap_mode="r", allow_pickle=False))
        except (OSError, ValueError, EOFError) as e:  # EOFError: an empty file
            raise ModelError(f"{path} is missing or unreadable ({e}): "
                             f"run `{EXPORT_COMMAND.format(run_dir)}`") from None
        if list(array.shape) != shape or array.dtype != np.float32:
            raise ModelError(f"{path} holds {array.dtype}{list(array.shape)}, expected float32{shape}: "
                             f"run `{EXPORT_COMMAND.format(run_dir)}`")
        weights[name] = array
    return weights


# ---------------------------------------------------------------- the model


def layer_norm(x, g, b, eps=1e-5):
    u = x.mean(axis=-1, keepdims=True)
    x = x - u
    s = (x * x).mean(axis=-1, keepdims=True)
    return x / np.sqrt(s + eps) * g + b


def gelu(x):
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x * x * x)))


def softmax(x):
    x = np.exp(x - x.max(axis=-1, keepdims=True))
    return x / x.sum(axis=-1, keepdims=True)


class GPT2:
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
        w = load_weights(run_dir, hp)
        self.wte, self.wpe = w["model/wte"], w["model/wpe"]
        self.ln_f = (w["model/ln_f/g"], w["model/ln_f/b"])
        self.blocks = []
        for i in range(self.n_layer):
            p = f"model/h{i}/"
            self.blocks.append({k: w[p + k] for k in (
                "ln_1/g", "ln_1/b", "ln_2/g", "ln_2/b", "attn/c_attn/b", "attn/c_proj/b",
                "mlp/c_fc/b", "mlp/c_proj/b")})
            for k in ("attn/c_attn/w", "attn/c_proj/w", "mlp/c_fc/w", "mlp/c_proj/w"):
                self.blocks[i][k] = w[p + k][0]  # [1, nx, nf] -> [nx, nf], a view
        try:
            self.tokenizer = Tokenizer(run_dir, self.n_vocab)
        except Exception as e:  # tokenizers raises its own exception types for bad files
            raise ModelError(f"the tokenizer files in {run_dir} are corrupt ({e})") from None
        if self.tokenizer.end_token is None:
            raise ModelError(f"{run_dir / 'encoder.json'} has no {END_OF_TEXT} token")
        self.run_dir = run_dir
        # The key/value cache, allocated once as an anonymous mapping: its pages become resident only
        # as positions are used (np.zeros would ask for 2 MB huge pages and make ~150 MB resident at once).
        shape = (self.n_layer, 2, MAX_NSAMPLES, self.n_head, self.n_ctx, self.n_embd // self.n_head)
        self.kv = np.frombuffer(mmap.mmap(-1, 4 * math.prod(shape)), np.float32).reshape(shape)
        self.lock = threading.Lock()  # one forward pass sequence at a time: the cache is shared

    def forward(self, tokens, past, all_logits=False):
        """tokens [B, T] at positions past..past+T-1, with the cache filled before `past`.

        Writes this step's keys/values into the cache; returns logits [B, V] of the last position
        (or [B, T, V] with all_logits, for tests)."""
        B, T = tokens.shape
        C, H = self.n_embd, self.n_head
        hd = C // H
        total = past + T
        x = (self.wte[tokens] + self.wpe[past:total]).reshape(B * T, C)
        if T > 1:  # causal mask: query i (at past+i) sees keys 0..past+i
            mask = np.arange(total)[None, :] > (past + np.arange(T))[:, None]
        for layer, blk in enumerate(self.blocks):
            h = layer_norm(x, blk["ln_1/g"], blk["ln_1/b"])
            qkv = (h @ blk["attn/c_attn/w"] + blk["attn/c_attn/b"]).reshape(B, T, 3, H, hd)
            q = qkv[:, :, 0].transpose(0, 2, 1, 3)  # [B, H, T, hd]
            cache_k = self.kv[layer, 0, :B]
            cache_v = self.kv[layer, 1, :B]
            cache_k[:, :, past:total] = qkv[:, :, 1].transpose(0, 2, 1, 3)
            cache_v[:, :, past:total] = qkv[:, :, 2].transpose(0, 2, 1, 3)
            att = (q @ cache_k[:, :, :total].transpose(0, 1, 3, 2)) * np.float32(1 / math.sqrt(hd))
            if T > 1:
                att[..., mask] = -1e10
            a = softmax(att) @ cache_v[:, :, :total]  # [B, H, T, hd]
            a = a.transpose(0, 2, 1, 3).reshape(B * T, C)
            x = x + (a @ blk["attn/c_proj/w"] + blk["attn/c_proj/b"])
            h = layer_norm(x, blk["ln_2/g"], blk["ln_2/b"])
            h = gelu(h @ blk["mlp/c_fc/w"] + blk["mlp/c_fc/b"])
            x = x + (h @ blk["mlp/c_proj/w"] + blk["mlp/c_proj/b"])
        if all_logits:
            return (layer_norm(x, *self.ln_f) @ self.wte.T).reshape(B, T, self.n_vocab)
        last = x.reshape(B, T, C)[:, -1]
        return layer_norm(last, *self.ln_f) @ self.wte.T


# ---------------------------------------------------------------- sampling


def filter_logits(logits, temperature, top_k, top_p):
    """gpt-2-simple's sample.py: divide by temperature, then top_p (if > 0) or top_k (if > 0)."""
    logits = logits / np.float32(temperature)
    if top_p > 0:
        ordered = -np.sort(-logits, axis=-1)
        probs = softmax(ordered.astype(np.float64))
        before = np.cumsum(probs, axis=-1) - probs  # exclusive cumulative sum
        kept = np.maximum((before < top_p).sum(axis=-1), 1)
        floor = ordered[np.arange(len(ordered)), kept - 1][:, None]
        logits = np.where(logits < floor, np.float32(-1e10), logits)
    elif 0 < top_k < logits.shape[-1]:
        floor = np.partition(logits, -top_k, axis=-1)[:, -top_k][:, None]
        logits = np.where(logits < floor, np.float32(-1e10), logits)
    return logits


def sample(logits, rng):
    """One token per row from softmax(logits)."""
    probs = softmax(logits.astype(np.float64))
    cdf = np.cumsum(probs, axis=-1)
    u = rng.random(len(cdf)) * cdf[:, -1]
    return np.array([min(np.searchsorted(c, x, side="right"), len(c) - 1) for c, x in zip(cdf, u)])


# ---------------------------------------------------------------- text


class SampleText:
    """One sample's text as tokens arrive: decoding, the stop markers, and what may be shown so far.

    As gpt-2-simple's generate(): text = prefix + generated text, cut at `truncate`, prefix dropped
    when include_prefix is false, leading newlines stripped. Unlike gpt-2-simple it stops at the
    first `truncate` or "<|endoftext|>" in the generated text, or when the end token is sampled."""

    def __init__(self, tokenizer, prefix, include_prefix, truncate):
        self.decoder = TextDecoder(tokenizer)
        self.end_token = tokenizer.end_token
        self.head = prefix if include_prefix else ""
        self.markers = [m for m in (truncate, END_OF_TEXT) if m]
        self.truncate = truncate
        self.generated = ""
        self.ids = []  # every sampled token id, in order
        self.stop_reason = None
        self.shown = 0  # characters of text() already handed out

    def add(self, token_id):
        self.ids.append(token_id)
        if token_id == self.end_token:
            self.stop_reason = "end_token"
        else:
            self._append(self.decoder.add(token_id))

    def finish(self):
        if self.stop_reason is None:
            self._append(self.decoder.flush())
        if self.stop_reason is None:
            self.stop_reason = "length"

    def _append(self, text):
        """Add decoded text; cut at the first stop marker that ends in it."""
        start = max(0, len(self.generated) - max(map(len, self.markers)) + 1)
        self.generated += text
        hits = [(i, m) for m in self.markers if (i := self.generated.find(m, start)) >= 0]
        if hits:
            i, m = min(hits, key=lambda hit: (hit[0], hit[1] != self.truncate))
            self.generated = self.generated[:i]
            self.stop_reason = "truncate" if m == self.truncate else "end_token"

    def text(self):
        """The text so far, holding back an ending that could still become a stop marker."""
        g = self.generated
        if self.stop_reason is None:
            hold = max((k for m in self.markers for k in range(1, len(m)) if g.endswith(m[:k])), default=0)
            g = g[:len(g) - hold]
        return (self.head + g).lstrip("\n")

    def new_piece(self):
        text = self.text()
        piece, self.shown = text[self.shown:], len(text)
        return piece


class Generation:
    """One request. Iterating runs the model one token at a time and yields the new text of the
    first sample (possibly ""); afterwards `result` holds the answer."""

    def __init__(self, model, prompt, *, prefix, length, temperature, top_k, top_p, seed, nsamples,
                 truncate, include_prefix):
        self.model, self.prompt, self.length = model, prompt, length
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.rng = np.random.default_rng(seed)
        self.samples = [SampleText(model.tokenizer, prefix, include_prefix, truncate) for _ in range(nsamples)]
        self.result = None

    def __iter__(self):
        model, samples = self.model, self.samples
        B, T = len(samples), len(self.prompt)
        with model.lock:
            started = time.perf_counter()
            logits = model.forward(np.array([self.prompt]), 0)
            if B > 1:  # same prompt for every row: compute it once, copy its keys/values
                model.kv[:, :, 1:B, :, :T] = model.kv[:, :, :1, :, :T]
                logits = np.repeat(logits, B, axis=0)
            for step in range(self.length):
                tokens = sample(filter_logits(logits, self.temperature, self.top_k, self.top_p), self.rng)
                for s, t in zip(samples, tokens):
                    if s.stop_reason is None:
                        s.add(int(t))
                if all(s.stop_reason for s in samples) or step + 1 == self.length:
                    break
                yield samples[0].new_piece()
                logits = model.forward(tokens[:, None], T + step)
            for s in samples:
                s.finish()
            seconds = time.perf_counter() - started
        yield samples[0].new_piece()
        texts = [s.text() for s in samples]
        self.result = {"text": texts[0], "tokens": sum(len(s.ids) for s in samples),
                       "stop_reason": samples[0].stop_reason, "seconds": round(seconds, 3)}
        if B > 1:
            self.result["texts"] = texts
            self.result["stop_reasons"] = [s.stop_reason for s in samples]

    def run(self):
        for _ in self:
            pass
        return self.result
