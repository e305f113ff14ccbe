"""What each sampling control of issue 26 costs: tokens per second with it on, against none, in one run.

    python bench/steering.py            # the GPT-2 124M shape (random weights), about 10 minutes
    python bench/steering.py --quick    # a small model, one round (the tests run it)

1. Over HTTP, `python -m app` with THREADS=1 (bench/serve.py's Server): for each control a request of
   --length tokens with it on and one with none, back to back (who goes first alternates), for --rounds
   rounds after one that warms up; tokens per second on the client's clock (reading the request and
   setting up its samplers included). A control's cost is 1 - the median over the rounds of its pair's
   ratio. `top_k` is a /v1 row, against /v1 without it; BLOCKLIST_FILE (1,000 words) is a second server,
   paired with the first's none.
2. In this process, on the same model, what the end-to-end figure cannot resolve on a busy machine: the
   sampler chain's time per token for each control (llama_sampler_apply on a fresh copy of one position's
   logits, over the whole vocabulary, as every draw sees them), including what a body cannot carry (a
   10,000-entry and a whole-vocabulary logit_bias); and the time to set up the most bad_words a request
   may send (tokenizing their spellings), once per request.
Writes steering.md (the tables), steering.png (the chart) and steering.json (every raw figure) to --out.
"""
import argparse
import ctypes
import datetime
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_model  # noqa: E402
import report  # noqa: E402
import serve  # noqa: E402
from app.params import BAD_WORDS_MAX  # noqa: E402 (the most bad_words a request may send)

PROMPT = serve.PROMPT
LIMIT = 0.03  # no control may cost more than this (issue 26)


def words(n, seed=0):
    """n distinct made-up words (as bench/make_model.py's corpus makes them)."""
    rng = random.Random(seed)
    onsets, nuclei, codas = ["b", "d", "f", "gr", "k", "l", "m", "pl", "s", "st", "tr", "v"], \
        ["a", "e", "i", "o", "u", "ea", "oo"], ["", "n", "r", "s", "t", "ck", "nd"]
    found = set()
    while len(found) < n:
        syllables = rng.randint(1, 3)
        found.add("".join(rng.choice(onsets) + rng.choice(nuclei) + rng.choice(codas) for _ in range(syllables)))
    return sorted(found)


def biggest_logit_bias(n_vocab, body_max=16 * 1024):
    """The largest logit_bias (token ids from 1 up, bias -5) that a POST / body of `ask` holding it stays
    within body_max bytes with."""
    body = {"prefix": PROMPT, "length": 100000, "temperature": 1.0, "seed": 100000, "logit_bias": {}}
    size, bias = len(json.dumps(body)), {}
    for n in range(1, n_vocab):
        size += len(json.dumps({str(n): -5})) - 2 + (2 if bias else 0)  # the entry, and ", " before it
        if size > body_max:
            break
        bias[str(n)] = -5
    assert len(json.dumps({**body, "logit_bias": bias})) <= body_max
    return bias


def controls(n_vocab):
    """(name, route, the control's parameters) of the HTTP rows; route "v1" for /v1/completions."""
    small_bias = {str(t): -5 for t in range(10, 20)}
    return [
        ("repetition_penalty 1.3", "/", {"repetition_penalty": 1.3}),
        ("frequency_penalty 0.5 + presence_penalty 0.5", "/", {"frequency_penalty": 0.5, "presence_penalty": 0.5}),
        ("min_p 0.05", "/", {"min_p": 0.05}),
        ("logit_bias, 10 entries", "/", {"logit_bias": small_bias}),
        (f"logit_bias, {len(biggest_logit_bias(n_vocab))} entries (a full 16 KiB body)", "/",
         {"logit_bias": biggest_logit_bias(n_vocab)}),
        ("bad_words, 10", "/", {"bad_words": words(10)}),
        (f"bad_words, {BAD_WORDS_MAX:,} new each request", "/", {"bad_words": "new"}),
        (f"bad_words, the same {BAD_WORDS_MAX:,} each request", "/", {"bad_words": words(BAD_WORDS_MAX)}),
        ("top_k 40 (/v1)", "v1", {"top_k": 40}),
        ("all of them (10 bad_words, 10 logit_bias)", "/", {
            "repetition_penalty": 1.3, "frequency_penalty": 0.5, "presence_penalty": 0.5, "min_p": 0.05,
            "logit_bias": small_bias, "bad_words": words(10)}),
        ("BLOCKLIST_FILE, 1,000 words", "blocklist", {}),
    ]


def ask(server, route, params, length, seed):
    """(tokens, client seconds) of one generation; every answer must run its full length."""
    if route == "v1":
        answer, seconds = server.request("POST", "/v1/completions", json.dumps(
            {"model": server.model_name, "prompt": PROMPT, "max_tokens": length, "temperature": 1.0, "seed": seed,
             **params}), {"Content-Type": "application/json"})
        choice = answer["choices"][0]  # the tokens generated: all of them unless it ended early
        tokens = length if choice["finish_reason"] == "length" else answer["usage"]["completion_tokens"]
    else:
        answer, seconds = server.request("POST", "/", json.dumps(
            {"prefix": PROMPT, "length": length, "temperature": 1.0, "seed": seed, **params}),
            {"Content-Type": "application/json"})
        tokens = answer["tokens"]
    return tokens, seconds


def bench_http(model, rows, rounds, length, logs):
    logs.mkdir(parents=True, exist_ok=True)
    blocklist = logs / "blocklist.txt"
    blocklist.write_text("\n".join(words(1000, seed=1)) + "\n", encoding="utf-8")
    plain = serve.Server(model, 1, logs / "server.log")
    blocked = serve.Server(model, 1, logs / "server-blocklist.log", env={"BLOCKLIST_FILE": str(blocklist)})
    figures = {name: [] for name, _, _ in rows}
    try:
        for server in (plain, blocked):
            server.first_answer({"length": 2})
            server.model_name = model.name
        for r in range(rounds + 1):  # round 0 warms up and is not counted
            for i, (name, route, params) in enumerate(rows):
                if params.get("bad_words") == "new":  # words no earlier request sent
                    params = {"bad_words": words(BAD_WORDS_MAX, seed=1000 + r)}
                on = (blocked, "/", {}) if route == "blocklist" else (plain, route, params)
                off = (plain, "v1" if route == "v1" else "/", {})
                seed = 1000 * r + i
                pair = [off, on] if (r + i) % 2 else [on, off]  # who goes first alternates
                measured = [ask(server, route_, params_, length, seed) for server, route_, params_ in pair]
                if r:
                    (off_tokens, off_s), (on_tokens, on_s) = measured if pair[0] is off else measured[::-1]
                    figures[name].append({"on_tokens_per_s": on_tokens / on_s, "off_tokens_per_s": off_tokens / off_s,
                                          "on_tokens": on_tokens, "off_tokens": off_tokens})
            print(f"round {r} of {rounds} done", file=sys.stderr)
    finally:
        plain.stop()
        blocked.stop()
    return figures


def bench_chain(model, repeats):
    """Microseconds per token of the sampler chain for each control, on one position's logits."""
    from app.engine import GPT2
    from app.llama_engine import L
    from app.steering import banned_phrases, controls as steering
    from app.engine import samplers

    gpt2 = GPT2(model)
    n_vocab = gpt2.n_vocab
    prompt = gpt2.tokenizer.encode(PROMPT)
    gpt2.llama.prompt(prompt)
    logits = ctypes.cast(L.llama_get_logits_ith(gpt2.llama.ctx, -1), ctypes.POINTER(ctypes.c_float))
    template = (L.llama_token_data * n_vocab)(*[(i, logits[i], 0.0) for i in range(n_vocab)])
    work = (L.llama_token_data * n_vocab)()

    def per_token(chain, n=100):
        array = L.llama_token_data_array(data=work, size=n_vocab, selected=-1, sorted=False)
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            for _ in range(n):
                ctypes.memmove(work, template, ctypes.sizeof(template))
                array.size, array.selected, array.sorted = n_vocab, -1, False
                L.llama_sampler_apply(chain, ctypes.byref(array))
            best = min(best, (time.perf_counter() - start) / n)
        return best * 1e6

    recent = [random.Random(0).randrange(n_vocab) for _ in range(64)]  # a full window of 64 distinct-ish tokens
    cases = {
        "none": {},
        "repetition_penalty 1.3": {"repetition_penalty": 1.3},
        "frequency_penalty 0.5 + presence_penalty 0.5": {"frequency_penalty": 0.5, "presence_penalty": 0.5},
        "min_p 0.05": {"min_p": 0.05},
        "logit_bias, 10 entries": {"logit_bias": {t: -5.0 for t in range(10, 20)}},
        "logit_bias, 10,000 entries": {"logit_bias": {t: -5.0 for t in range(1, min(10_001, n_vocab))}},
        f"logit_bias, {n_vocab:,} entries (every token)": {"logit_bias": {t: -5.0 for t in range(n_vocab)}},
        "bad_words, 10": {"bad_words": words(10)},
        f"bad_words, {BAD_WORDS_MAX:,}": {"bad_words": words(BAD_WORDS_MAX)},
        "top_k 40": {},
    }
    chain = {}
    for name, params in cases.items():
        args, steps, _ = steering(gpt2, prompt, **params)
        sampler = samplers(1.0, 40 if name == "top_k 40" else 0, 0.0, 1, 1, args, steps, recent)[0]
        chain[name] = [per_token(sampler.chain) for _ in range(3)]
    # llama.cpp's own penalties sampler, which we do not use: it looks up every token each step
    llama_penalties = L.llama_sampler_chain_init(L.llama_sampler_chain_default_params())
    for s in (L.llama_sampler_init_penalties(n_vocab, 64, 1.3, 0.0, 0.0), L.llama_sampler_init_temp(1.0),
              L.llama_sampler_init_dist(1)):
        L.llama_sampler_chain_add(llama_penalties, s)
    for t in recent:
        L.llama_sampler_accept(llama_penalties, t)
    chain["llama.cpp's penalties sampler (not used)"] = [per_token(llama_penalties) for _ in range(3)]
    L.llama_sampler_free(llama_penalties)
    setup = {"new": [], "cached": []}  # new words, and the same ones again (set up once, kept)
    for repeat in range(repeats):
        new = tuple(words(BAD_WORDS_MAX, seed=2000 + repeat))
        for kind in ("new", "cached"):
            start = time.perf_counter()
            banned_phrases(new, gpt2.tokenizer)
            setup[kind].append(time.perf_counter() - start)
    banned = banned_phrases(new, gpt2.tokenizer)  # the last words timed, kept set up: their spellings counted
    return {"us_per_token": chain, "n_vocab": n_vocab, "bad_words": BAD_WORDS_MAX,
            "bad_words_setup_s": {k: min(v) for k, v in setup.items()},
            "bad_words_spellings": {"one token": len(banned.tokens),
                                    "several tokens": sum(map(len, banned.endings.values()))}}


def summarize(results):
    http = {name: {"on_tokens_per_s": statistics.median(r["on_tokens_per_s"] for r in runs),
                   "off_tokens_per_s": statistics.median(r["off_tokens_per_s"] for r in runs),
                   "ratio": statistics.median(r["on_tokens_per_s"] / r["off_tokens_per_s"] for r in runs),
                   "ratios": [r["on_tokens_per_s"] / r["off_tokens_per_s"] for r in runs]}
            for name, runs in results["http"].items()}
    for row in http.values():
        row["cost"] = 1 - row["ratio"]
        row["met"] = row["cost"] <= LIMIT
    chain = {name: min(values) for name, values in results["chain"]["us_per_token"].items()}
    token_us = 1e6 / statistics.median(row["off_tokens_per_s"] for row in http.values())
    return {"http": http, "chain_us_per_token": chain, "token_us": token_us,
            "chain_share": {name: (us - chain["none"]) / token_us for name, us in chain.items()}}


def table(results):
    s, m = results["summary"], results["machine"]
    lines = [f"Sampling controls, {results['date']}, {m['cpu']}, {m['cores']} cores, load average "
             f"{results['load_average'][0]:.1f}-{results['load_average'][1]:.1f}; {results['model']}, 1 thread, "
             f"{results['length']} tokens, temperature 1, {results['rounds']} rounds",
             "", "| control | tokens/s with | without | with / without (median of rounds) | cost | at most 3% |",
             "| --- | ---: | ---: | ---: | ---: | --- |"]
    for name, row in s["http"].items():
        lines.append(f"| {name} | {report.fmt(row['on_tokens_per_s'], 1)} | {report.fmt(row['off_tokens_per_s'], 1)} | "
                     f"{row['ratio']:.3f} ({min(row['ratios']):.3f}-{max(row['ratios']):.3f}) | "
                     f"{100 * row['cost']:.1f}% | {'met' if row['met'] else 'MISSED'} |")
    lines += ["", f"The sampler chain alone, one position's logits ({results['chain']['n_vocab']:,} tokens), best of "
              f"{results['repeats']}; the share is of a token's {s['token_us'] / 1000:.1f} ms measured above:", "",
              "| chain | µs per token | more than none | share of a token |", "| --- | ---: | ---: | ---: |"]
    for name, us in s["chain_us_per_token"].items():
        lines.append(f"| {name} | {us:,.0f} | {us - s['chain_us_per_token']['none']:+,.0f} | "
                     f"{100 * s['chain_share'][name]:+.1f}% |")
    spellings = results["chain"]["bad_words_spellings"]
    lines += ["", f"Setting up {results['chain']['bad_words']:,} bad_words (tokenizing their "
              f"{sum(spellings.values()):,} spellings: "
              f"{spellings['one token']:,} of one token, {spellings['several tokens']:,} of several): "
              f"{1000 * results['chain']['bad_words_setup_s']['new']:.0f} ms a request, "
              f"{1000 * results['chain']['bad_words_setup_s']['cached']:.0f} ms when the same words come again "
              "(the last 16 lists are kept set up)."]
    return "\n".join(lines)


def chart(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = results["summary"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(14, 6))
    names = list(s["http"])
    left.barh(names, [100 * s["http"][n]["cost"] for n in names], color="#1f77b4", alpha=0.8)
    for i, n in enumerate(names):
        left.plot([100 * (1 - r) for r in s["http"][n]["ratios"]], [i] * len(s["http"][n]["ratios"]), "k.")
    left.axvline(100 * LIMIT, color="red", linestyle="--", label="3% (the limit)")
    left.axvline(0, color="black", linewidth=0.5)
    left.invert_yaxis()
    left.set_xlabel("cost: % fewer tokens/s than without (bar: median; dots: rounds)")
    left.set_title(f"Over HTTP, {results['length']}-token answers, 1 thread", fontsize=10)
    left.legend(fontsize=8)
    names = list(s["chain_us_per_token"])
    right.barh(names, [s["chain_us_per_token"][n] for n in names], color="#ff7f0e", alpha=0.8)
    right.invert_yaxis()
    right.set_xlabel("µs per token (the sampler chain alone)")
    right.set_title(f"The sampler chain alone ({results['chain']['n_vocab']:,} tokens); a token: "
                    f"{s['token_us'] / 1000:.1f} ms", fontsize=10)
    fig.suptitle(f"Sampling controls: {results['date']}, {results['machine']['cpu']}, {results['model']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a small model, one round, short answers")
    p.add_argument("--out", help="output folder (default bench/out, or bench/out/quick with --quick)")
    p.add_argument("--models", help="where built models are cached (default bench/out/models)")
    p.add_argument("--rounds", type=int, help="rounds of every pair (default 6, 1 with --quick)")
    p.add_argument("--length", type=int, help="tokens an answer (default 100, 20 with --quick)")
    args = p.parse_args()
    rounds, length = args.rounds or (1 if args.quick else 6), args.length or (20 if args.quick else 100)
    if rounds < 1 or length < 1:
        sys.exit("bench/steering.py: --rounds and --length must be at least 1")
    out = Path(args.out or ROOT / "bench" / "out" / ("quick" if args.quick else "")).resolve()
    if out.exists() and not out.is_dir():
        sys.exit(f"bench/steering.py: --out {out} is a file, not a folder")
    out.mkdir(parents=True, exist_ok=True)
    models_dir = Path(args.models or ROOT / "bench" / "out" / "models").resolve()
    shape, name = (serve.SMALL_SHAPE, "small-random") if args.quick else (make_model.SHAPE_124M, "gpt2-124M-random")
    os.environ.update(serve.thread_env(1))  # this process's llama.cpp too
    load_before = os.getloadavg()[0]
    try:
        model = serve.build_random(models_dir, name, shape, out / "logs")
        n_vocab = json.loads((model / "hparams.json").read_text())["n_vocab"]
        http = bench_http(model, controls(n_vocab), rounds, length, out / "logs")
        chain = bench_chain(model, 2 if args.quick else 5)
    except serve.BenchError as e:
        sys.exit(f"bench/steering.py: {e}")
    except KeyboardInterrupt:
        sys.exit("bench/steering.py: interrupted; no figures written")
    results = {"date": datetime.date.today().isoformat(), "mode": "quick" if args.quick else "full",
               "machine": serve.machine(), "model": f"{name} (n_layer {shape['n_layer']}, n_embd {shape['n_embd']}, "
               f"n_vocab {shape['n_vocab']}, Q8_0)", "length": length, "rounds": rounds,
               "repeats": 2 if args.quick else 5, "load_average": [load_before, os.getloadavg()[0]],
               "http": http, "chain": chain}
    results["summary"] = summarize(results)
    print(report.write_outputs(out, results, "steering", table, chart))
    print(f"\nwrote {out / 'steering.md'}, {out / 'steering.png'}, {out / 'steering.json'}")


if __name__ == "__main__":
    main()
