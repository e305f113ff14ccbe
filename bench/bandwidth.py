"""Memory read bandwidth, and the tokens/s ceiling it puts on one-token-at-a-time decoding.

Generating one token reads every weight once (the blocks, and all of wte for the logits; of wpe
only one row), so tokens/s can not exceed bandwidth / bytes of weights read per token. The key/value
cache adds 2 * n_layer * position * n_embd * 4 bytes per token, left out here (7% at position 500
for the 124M shape), which makes the ceiling slightly generous.
"""
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np


def read_bandwidth(threads, megabytes=512, repeats=5):
    """Bytes/s of a numpy sum over an array far larger than any cache, split over `threads`
    threads (numpy releases the GIL in the reduction). Median of `repeats` passes."""
    array = np.ones(megabytes * 1024 * 1024 // 4, dtype=np.float32)
    parts = np.array_split(array, threads)
    seconds = []
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(np.sum, parts))  # fault the pages in once
        for _ in range(repeats):
            start = time.perf_counter()
            list(pool.map(np.sum, parts))
            seconds.append(time.perf_counter() - start)
    return array.nbytes / float(np.median(seconds))


def weight_bytes_per_token(manifest):
    """Bytes of weights one decoding step reads, from an export's manifest.json."""
    total = 0
    for name, info in manifest["tensors"].items():
        size = 4 * int(np.prod(info["shape"]))
        if name.endswith("/wpe"):
            size //= info["shape"][0]  # one position row
        total += size
    return total
