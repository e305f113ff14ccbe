"""The baseline contender: gpt-2-simple as gpt-2-cloud-run serves it, run in its own process.

    python bench/baseline.py RUN_DIR PLAN_JSON

gpt-2-cloud-run's app does, at import, `sess = gpt2.start_tf_sess(threads=1); gpt2.load_gpt2(sess)`
and then one fresh `gpt2.generate(sess, ..., return_as_list=True)[0]` per request. This does the
same calls without the HTTP layer (which only flatters the baseline) and prints one JSON object
per line on stdout: {"event": ..., "t": time.time(), ...}. The parent process times cold start
from its own clock before it started this process to the "first_answer" event.

PLAN_JSON: {"threads": 1, "prefix": "...", "first_length": 20,
            "warm": [[length, seed], ...], "growth_seconds": 60, "growth_length": 20,
            "early_stop": {"length": 300, "prefix": "<|startoftext|>", "truncate": "<|endoftext|>",
                           "seeds": [1, 2]}}
(every key but threads is optional; a missing step is skipped).
"""
import json
import os
import sys
import time


def emit(event, **fields):
    print(json.dumps({"event": event, "t": time.time(), **fields}), flush=True)


def memory_mb(pid="self"):
    """Resident set size now and its high-water mark (peak) of a process (this one by default), from /proc."""
    with open(f"/proc/{pid}/status") as f:
        status = dict(line.split(":", 1) for line in f)
    return {key: int(status[name].split()[0]) / 1024 for key, name in
            [("rss", "VmRSS"), ("peak", "VmHWM"), ("anon", "RssAnon"), ("file", "RssFile")]}


def main():
    run_dir, plan = sys.argv[1], json.loads(sys.argv[2])
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import gpt_2_simple as gpt2
    from gpt_2_simple.src import encoder

    checkpoint_dir, run_name = os.path.split(os.path.abspath(run_dir))
    where = {"run_name": run_name, "checkpoint_dir": checkpoint_dir}
    emit("imported")

    sess = gpt2.start_tf_sess(threads=plan["threads"])
    gpt2.load_gpt2(sess, **where)
    emit("loaded", memory=memory_mb())
    enc = encoder.get_encoder(run_dir)

    def generate(length, seed, prefix=plan.get("prefix"), truncate=None):
        start = time.perf_counter()
        text = gpt2.generate(sess, length=length, temperature=0.7, top_k=0, prefix=prefix,
                             truncate=truncate, seed=seed, return_as_list=True, **where)[0]
        return text, time.perf_counter() - start

    if plan.get("first_length"):
        text, seconds = generate(plan["first_length"], seed=0)
        emit("first_answer", seconds=seconds, chars=len(text), memory=memory_mb())

    for length, seed in plan.get("warm", []):
        _, seconds = generate(length, seed)
        emit("warm", length=length, seed=seed, seconds=seconds, memory=memory_mb())

    if plan.get("growth_seconds"):
        deadline = time.perf_counter() + plan["growth_seconds"]
        n = 0
        while time.perf_counter() < deadline:
            n += 1
            _, seconds = generate(plan["growth_length"], seed=n)
            emit("growth", request=n, seconds=seconds, memory=memory_mb())

    early = plan.get("early_stop")
    for seed in early["seeds"] if early else []:
        text, seconds = generate(early["length"], seed, early["prefix"], early["truncate"])
        # gpt-2-simple's sampling loop has no stop condition (cond returns True): it always runs
        # `length` steps. The token count of an untruncated answer (a second call) is the evidence.
        full, _ = generate(early["length"], seed, early["prefix"], None)
        emit("early_stop", seed=seed, length=early["length"], seconds=seconds, text=text,
             tokens_computed=early["length"],
             untruncated_tokens=len(enc.encode(full)) - len(enc.encode(early["prefix"])))

    emit("done", memory=memory_mb())


if __name__ == "__main__":
    main()
