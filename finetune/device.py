"""What TensorFlow trains on (a GPU, else the CPU) and the session configuration for it."""
import os

import tensorflow as tf
from tensorflow.core.protobuf import rewriter_config_pb2

from finetune import UsageError, precision


def session_config():
    """The configuration gpt_2_simple.start_tf_sess() uses."""
    config = tf.compat.v1.ConfigProto()
    config.gpu_options.allow_growth = True
    config.graph_options.rewrite_options.layout_optimizer = rewriter_config_pb2.RewriterConfig.OFF
    return config


def start_session(precision_name="fp32"):
    return tf.compat.v1.Session(config=precision.configure(session_config(), precision_name))


class Device:
    """What TensorFlow trains on: the first GPU it sees, else the CPU."""

    def __init__(self):
        from tensorflow.python.client import device_lib
        gpus = [d for d in device_lib.list_local_devices(session_config=session_config())
                if d.device_type == "GPU"]
        self.gpu = bool(gpus)
        self.capability = None  # a GPU's compute capability, (8, 9) for an L4
        if gpus:  # physical_device_desc: "device: 0, name: NVIDIA L4, pci bus id: ..., compute capability: 8.9"
            fields = dict(f.split(": ", 1) for f in gpus[0].physical_device_desc.split(", ") if ": " in f)
            self.memory = gpus[0].memory_limit  # what TensorFlow may allocate on it
            self.name = f"GPU: {fields.get('name', gpus[0].name)}, {self.memory / 2**30:.1f} GiB"
            if "compute capability" in fields:
                self.capability = tuple(int(n) for n in fields["compute capability"].split("."))
        else:
            self.memory = available_memory()
            self.name = f"CPU, {len(os.sched_getaffinity(0))} threads"

    def __str__(self):
        return self.name


def available_memory():
    """Bytes this process may still allocate: MemAvailable, or less under a cgroup (container) limit."""
    available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        with open("/sys/fs/cgroup/memory.current") as f:
            used = int(f.read())
        if limit != "max":
            available = min(available, int(limit) - used)
    except (OSError, ValueError):
        pass
    return available


def require_gpu():
    """For jobs billed for a GPU: stop at once, in one line, when TensorFlow sees none."""
    if not tf.config.list_physical_devices("GPU"):
        info = tf.sysconfig.get_build_info()
        built = (f"built for CUDA {info['cuda_version']}, cuDNN {info['cudnn_version']}"
                 if info.get("is_cuda_build") else "a CPU-only build")
        raise UsageError(f"a GPU was required (--require-gpu) but TensorFlow {tf.__version__} "
                         f"({built}) sees none: check the driver with nvidia-smi")
