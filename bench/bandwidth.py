"""Memory read bandwidth, and the tokens/s ceiling it puts on one-token-at-a-time decoding.

Generating one token reads every weight once (the blocks, and all of wte for the logits; of wpe
only one row), so tokens/s can not exceed bandwidth / bytes of weights read per token. The key/value
cache adds 2 * n_layer * position * n_embd * 2 bytes per token (float16), left out here (14% at position 500
for the 124M shape at Q8_0), which makes the ceiling generous.
"""
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np


def read_bandwidth(threads, megabytes=512, repeats=5):
    """Bytes/s read from an array far larger than any cache, median of `repeats` passes, two ways:
    a numpy sum split over `threads` threads (numpy releases the GIL in the reduction), and a BLAS
    matrix-vector product (the kernel the engine's layers are made of; its threads come from
    OMP/OPENBLAS_NUM_THREADS, so run this in a process started with those set: see main())."""
    matrix = np.ones((megabytes * 1024 * 1024 // 4 // 768, 768), dtype=np.float32)
    flat, vector = matrix.reshape(-1), np.ones(768, dtype=np.float32)
    parts = np.array_split(flat, threads)

    def median_rate(read):
        read()  # fault the pages in once
        seconds = []
        for _ in range(repeats):
            start = time.perf_counter()
            read()
            seconds.append(time.perf_counter() - start)
        return matrix.nbytes / float(np.median(seconds))

    with ThreadPoolExecutor(threads) as pool:
        numpy_sum = median_rate(lambda: list(pool.map(np.sum, parts)))
    return {"numpy_sum": numpy_sum, "blas_gemv": median_rate(lambda: matrix @ vector)}


def main():
    """python bench/bandwidth.py THREADS: print read_bandwidth(THREADS) as JSON."""
    print(json.dumps(read_bandwidth(int(sys.argv[1]))))


def weight_bytes_per_token(gguf_path):
    """Bytes of weights one decoding step reads, from the exported GGUF file's tensors."""
    import gguf

    total = 0
    for tensor in gguf.GGUFReader(gguf_path).tensors:
        size = int(tensor.n_bytes)
        if tensor.name == "position_embd.weight":
            size //= int(tensor.shape[-1])  # one position row (ggml lists the row length first)
        total += size
    return total


if __name__ == "__main__":
    main()
