"""Does a training run fit the device's memory? The estimate, and the smallest change that fits.

    needs = estimate(hparams, Options(...))      # bytes, by part
    check(hparams, options, memory, "the L4")    # raises UsageError naming the fix when it does not fit

Parts (bytes; P parameters, T of them trained, B x W tokens a batch, L layers, E width, H heads):
  weights 4P, plus a 2-byte copy in bf16/fp16 (the rewrite's casts); Adam's two moments 8T (SGD
  none); the gradient accumulator 4T (--accumulate-gradients above 1); the gradients in flight, one
  set 4T; activations kept for the backward pass, per token and layer (34E + 5HW) values of 2 bytes
  in bf16/fp16 and 4 in fp32 (Korthikanti et al. 2022), or with --recompute only each block's
  input (4E per token and layer) plus one block's activations; the logits, their softmax and their
  gradient, 3 x 4 bytes per token and vocabulary entry; on the CPU, TensorFlow's own memory.
The CPU constants were fitted to peak RSS measured on this project's machine (docs/training-memory.md).
"""
from dataclasses import dataclass
from itertools import combinations

from finetune import UsageError

# GPT-2 releases: n_layer, n_embd, n_head (n_vocab 50257, n_ctx 1024).
RELEASES = {"124M": (12, 768, 12), "355M": (24, 1024, 16), "774M": (36, 1280, 20), "1558M": (48, 1600, 25)}
GIB = 2 ** 30
# What TensorFlow may allocate on an NVIDIA L4 (estimated, no L4 here): 23,034 MiB, less ~400 MiB
# for the CUDA context and the 1,536 MiB TensorFlow leaves to the system on compute capability 8.x
# (MinSystemMemory in gpu_device.cc).
L4_MEMORY = (23034 - 400 - 1536) * 2 ** 20
L4_CAPABILITY = (8, 9)
CPU_RUNTIME = 1.0 * GIB  # TensorFlow itself (~0.7, a tiny model's peak RSS) and allocator slack at 124M/355M


@dataclass
class Options:
    batch_size: int = 1
    window: int = 1024
    accumulate: int = 5
    optimizer: str = "adam"
    train_layers: str = "all"
    recompute: bool = False
    precision: str = "fp32"

    @classmethod
    def from_args(cls, args, window, precision):
        """python -m finetune's flags; window and precision as resolved for the device."""
        return cls(batch_size=args.batch_size, window=window, accumulate=args.accumulate_gradients,
                   optimizer=args.optimizer, train_layers=args.train_layers, recompute=args.recompute,
                   precision=precision)

    def changed(self, **kw):
        return Options(**{**self.__dict__, **kw})


@dataclass
class Shape:
    n_vocab: int
    n_ctx: int
    n_embd: int
    n_head: int
    n_layer: int


def release_shape(name):
    n_layer, n_embd, n_head = RELEASES[name]
    return Shape(50257, 1024, n_embd, n_head, n_layer)


def parameters(hp):
    """(all, trained with --train-layers transformer): gpt-2-simple's '/h' variables are the blocks."""
    blocks = hp.n_layer * (12 * hp.n_embd ** 2 + 13 * hp.n_embd)
    return hp.n_vocab * hp.n_embd + hp.n_ctx * hp.n_embd + blocks + 2 * hp.n_embd, blocks


def estimate(hp, o, cpu=False):
    """Bytes a training step needs, by part."""
    total, blocks = parameters(hp)
    trained = blocks if o.train_layers == "transformer" else total
    half = o.precision in ("bf16", "fp16")
    tokens = o.batch_size * o.window
    per_layer = (34 * hp.n_embd + 5 * hp.n_head * o.window) * (2 if half else 4)  # per token
    if o.recompute:
        activations = tokens * (hp.n_layer * 4 * hp.n_embd + per_layer)
    else:
        activations = tokens * hp.n_layer * per_layer
    return {"weights": total * (6 if half else 4),
            "optimizer": 8 * trained if o.optimizer == "adam" else 0,
            "accumulator": 4 * trained if o.accumulate > 1 else 0,
            "gradients": 4 * trained,
            "activations": activations,
            "logits": 3 * 4 * tokens * hp.n_vocab,
            "runtime": CPU_RUNTIME if cpu else 0}


def needed(hp, o, cpu=False):
    return sum(estimate(hp, o, cpu).values())


def changes(o):
    """Changes that save memory, each (flags, options), the ones that change training least first."""
    single = []
    if not o.recompute:
        single.append((["--recompute"], {"recompute": True}))
    if o.train_layers == "all":
        single.append((["--train-layers", "transformer"], {"train_layers": "transformer"}))
    if o.optimizer == "adam":
        single.append((["--optimizer", "sgd"], {"optimizer": "sgd"}))
    if o.accumulate > 1:
        single.append((["--accumulate-gradients", "1"], {"accumulate": 1}))
    for size in range(1, len(single) + 1):
        for combo in combinations(single, size):
            yield [f for flags, _ in combo for f in flags], o.changed(**{k: v for _, kw in combo for k, v in kw.items()})
    if o.batch_size > 1:
        yield ["--batch-size", "1"], o.changed(batch_size=1)
    window = o.window
    while window > 256:
        window //= 2
        yield ["--window", str(window)], o.changed(window=window)


def describe(o):
    return (f"{'Adam' if o.optimizer == 'adam' else 'SGD'}, "
            f"{'all weights' if o.train_layers == 'all' else 'transformer layers'}"
            f"{', --recompute' if o.recompute else ''}, {o.precision}, "
            f"{o.batch_size} x {o.window:,} tokens")


def check(hp, o, memory, device, cpu=False, name=None):
    """Raise UsageError, one line with the smallest change that fits, when the run does not fit."""
    need = needed(hp, o, cpu)
    if need <= memory:
        return need
    if name is None:
        millions = parameters(hp)[0] / 1e6
        name = f"a {millions:.0f}M-parameter model" if millions >= 10 else f"a {millions:.2g}M-parameter model"
    head = (f"{name} ({describe(o)}) needs ~{need / GIB:.1f} GiB, {device} gives TensorFlow "
            f"~{memory / GIB:.1f} GiB")
    for flags, smaller in changes(o):
        if needed(hp, smaller, cpu) <= memory:
            raise UsageError(f"{head}: add {' '.join(flags)} (~{needed(hp, smaller, cpu) / GIB:.1f} GiB)")
    raise UsageError(f"{head}, and no combination of --recompute, --train-layers transformer, --optimizer sgd, "
                     "--accumulate-gradients 1 or a smaller --batch-size/--window fits: use a smaller --model")
