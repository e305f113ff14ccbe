"""Log-probabilities from one position's raw logits, in plain Python (the server has no NumPy): the
log-softmax of the logits as the model computed them, before temperature, top-k, top-p or any other
sampler touches them. A row is an array('f') of n_vocab floats (app/llama_engine.py `row`); the sums
run in double precision. bench/scoring.py measures what a row costs.
"""
import heapq
import math
import struct


def log_sum_exp(row):
    """log(sum(exp(row))): directly while no exp overflows or all underflow (GPT-2's logits lie far
    inside that), else shifted by the largest (a shift costs 2.5 times as much: measured)."""
    try:
        total = sum(map(math.exp, row))
        if total > 0:
            return math.log(total)
    except OverflowError:
        pass
    m = max(row)
    return math.log(sum(map(math.exp, map(m.__rsub__, row)))) + m


def score(row, token, k):
    """(log-probability of `token`, [(id, log-probability)] of the k likeliest tokens, likeliest first)."""
    total = log_sum_exp(row)
    top, data, found = [], row.tobytes(), set()
    for value in (heapq.nlargest(k, row) if k > 1 else [max(row)]) if k else ():
        # where it is: its 4 bytes searched in the row's (memchr speed; array.index compares float
        # objects, 1-2 ms a search), at a float's boundary, not one found already (equal values)
        pattern, at = struct.pack("f", value), -1
        while (at := data.find(pattern, at + 1)) % 4 or at // 4 in found:
            pass
        found.add(at // 4)
        top.append((at // 4, value - total))
    return row[token] - total, top
