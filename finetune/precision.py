"""--precision auto|fp32|bf16|fp16: which arithmetic a training step uses, and its graph rewrite.

The weights, the optimizer state and the checkpoints stay float32 in every precision; TensorFlow's
graph rewrites cast to the lower precision inside the step only, so a run moves between
precisions and machines freely.

- bf16: oneDNN's auto mixed precision rewrite (`auto_mixed_precision_onednn_bfloat16`), for CPUs
  that compute bfloat16 natively (AMX or AVX512-BF16); bfloat16 has float32's range, so no scaling.
- fp16: the CUDA auto mixed precision rewrite (`auto_mixed_precision`), for GPUs of compute
  capability 7.0 or more (tensor cores), with dynamic loss scaling (finetune.optimizer.LossScale).

No TensorFlow import at module level: finetune.cloud chooses the L4's precision without it.
"""
from finetune import UsageError


def cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_has_bf16(flags=None):
    flags = cpu_flags() if flags is None else flags
    return bool(flags & {"amx_bf16", "avx512_bf16"})


def choose(requested, gpu_capability=None, cpu_bf16=None):
    """(precision, why) for a device: gpu_capability is (major, minor) of the GPU TensorFlow trains
    on, None on the CPU; cpu_bf16 whether the CPU computes bfloat16 (default: this one's flags)."""
    cpu_bf16 = cpu_has_bf16() if cpu_bf16 is None else cpu_bf16
    fp16_ok = gpu_capability is not None and gpu_capability >= (7, 0)
    bf16_ok = gpu_capability is None and cpu_bf16
    if requested == "auto":
        if fp16_ok:
            return "fp16", f"auto: compute capability {gpu_capability[0]}.{gpu_capability[1]}"
        if bf16_ok:
            return "bf16", "auto: a CPU with AMX/AVX512-BF16"
        return "fp32", "auto: a CPU without bfloat16" if gpu_capability is None else \
            f"auto: compute capability {gpu_capability[0]}.{gpu_capability[1]}, below 7.0"
    if requested == "fp16" and not fp16_ok:
        raise UsageError("--precision fp16 needs a GPU of compute capability 7.0 or more (TensorFlow's "
                         "float16 rewrite runs only there): use --precision auto")
    if requested == "bf16" and not bf16_ok:
        raise UsageError("--precision bf16 needs a CPU with AMX or AVX512-BF16 and no GPU (TensorFlow's "
                         "bfloat16 rewrite is oneDNN's, for the CPU): use --precision auto")
    return requested, f"--precision {requested}"


def describe(precision):
    return {"fp32": "float32", "bf16": "bfloat16 mixed precision",
            "fp16": "float16 mixed precision with dynamic loss scaling"}[precision]


def configure(config, precision):
    """Switch the session's graph rewrite for precision on in config (a ConfigProto)."""
    from tensorflow.core.protobuf import rewriter_config_pb2
    rewrites = config.graph_options.rewrite_options
    if precision == "bf16":
        rewrites.auto_mixed_precision_onednn_bfloat16 = rewriter_config_pb2.RewriterConfig.ON
    elif precision == "fp16":
        rewrites.auto_mixed_precision = rewriter_config_pb2.RewriterConfig.ON
    return config
