"""Medians, the table (markdown) and the chart (PNG) of bench/serve.py's raw figures; and the one writer
of every bench's STEM.json, .md and .png."""
import json
import os
import tempfile
from pathlib import Path

import numpy as np

NAMES = {"baseline": "gpt-2-simple", "ours": "our server"}
# The NumPy float32 engine this server replaced, as bench/results/2026-11-23.md measured it on this
# machine (quiet, 124M shape, 1 thread): the engine no longer exists to run beside the others.
NUMPY_ENGINE = {"tokens_per_s": 50.4, "cold_start_s": 1.11, "peak_rss_mb": 588, "source": "bench/results/2026-11-23.md"}
TARGETS = {"speedup_numpy": 2.3, "vs_llama": 0.9, "cold_start_s": NUMPY_ENGINE["cold_start_s"], "peak_rss_mb": 300,
           "growth_mb": 5}
# Ours against llama-server in the same run (issue 20): at most these ratios (at least, for tokens/s).
PEER_TARGETS = {"cold_start_s": 1.0, "peak_mb": 1.1, "tokens_per_s": 1.0}
# Cloud Run list prices, Tier 1 regions, request-based billing (CPU only while a request is handled),
# before the free tier: https://cloud.google.com/run/pricing as read on 2026-11-23.
PRICES = {"vcpu_s": 0.000024, "gib_s": 0.0000025, "request": 0.40 / 1e6,
          "source": "https://cloud.google.com/run/pricing (Tier 1, request-based billing, read 2026-11-23)"}
MEMORY_SETTINGS_GIB = [0.5, 1, 2, 4, 8, 16, 32]


def median(values):
    return float(np.median(values)) if len(values) else None


def summarize(results):
    """Medians per contender, the bandwidth ceiling, the side-by-side with llama-server, and each
    target met or missed."""
    summary = summarize_contenders(results) if "contenders" in results else {}
    if results.get("peer"):
        summary["peer"] = summarize_peer(results["peer"])
    return summary


def summarize_peer(peer):
    """Medians over the rounds for each server, and ours / llama-server's for each figure."""
    def figures(f):
        figures = {"cold_start_s": f["cold_start_s"], "cold_start_cpu_s": f["cold_start_cpu_s"], "peak_mb": f["peak_mb"],
                   "tokens_per_s": median([r["tokens"] / r["seconds"] for r in f["warm"]])}
        if "cpu_seconds" in f["warm"][0]:  # older runs lack it
            figures["cpu_ms_per_token"] = median([1000 * r["cpu_seconds"] / r["tokens"] for r in f["warm"]])
        return figures

    per_round = [{name: figures(f) for name, f in r.items()} for r in peer["rounds"]]
    summary = {name: {key: median([r[name][key] for r in per_round]) for key in per_round[0][name]}
               for name in ("ours", "llama_server")}
    summary["rounds"] = per_round
    summary["targets"] = {}
    for key, bound in PEER_TARGETS.items():
        value = summary["ours"][key] / summary["llama_server"][key]
        higher = key == "tokens_per_s"  # better when higher
        summary["targets"][key] = {"value": value, "target": f"{'>=' if higher else '<='} {bound}x llama-server",
                                   "met": value >= bound if higher else value <= bound}
    return summary


def summarize_contenders(results):
    summary = {}
    for name, c in results["contenders"].items():
        mem = c["memory"]
        growth = mem["growth"]
        growth_mb = growth[-1]["rss_mb"] - mem["growth_start_mb"] if growth else None
        summary[name] = {
            "cold_start_s": median(c["cold_start_s"]),
            "latency_s": {t: {n: median([r["seconds"] for r in runs]) for n, runs in w.items()}
                          for t, w in c["warm"].items()},
            "tokens_per_s": {t: {n: median([r["tokens"] / r["seconds"] for r in runs]) for n, runs in w.items()}
                             for t, w in c["warm"].items()},
            "rss_after_load_mb": mem["after_load_mb"],
            "peak_rss_mb": mem["peak_mb"],
            "growth_requests": len(growth),
            "growth_mb": growth_mb,
            "growth_mb_per_request": growth_mb / len(growth) if growth else None,
            "early_stop_tokens": median([e["tokens_computed"] for e in c["early_stop"]]),
            "early_stop_seconds": median([e["seconds"] for e in c["early_stop"]]),
        }
    per_token = results["model"]["weight_bytes_per_token"]
    # the faster of the two reads is the better estimate of what the memory system delivers
    ceiling = {t: max(bw.values()) / per_token for t, bw in results["bandwidth_bytes_per_s"].items()}
    summary["ceiling_tokens_per_s"] = ceiling
    ours, base = summary["ours"], summary["baseline"]
    for name in ("ours", "baseline"):
        summary[f"{name}_fraction_of_ceiling"] = {t: {n: v / ceiling[t] for n, v in w.items()}
                                                  for t, w in summary[name]["tokens_per_s"].items()}
    speed = ours["tokens_per_s"]["1"].get("100")
    engines = {q: {t: {kind: {"tokens_per_s": median([r["tokens"] / r["seconds"] for r in f["warm"]]),
                              "peak_mb": f["peak_mb"], "cold_start_s": f["cold_start_s"]}
                       for kind, f in per_thread.items()}
                   for t, per_thread in e.items() if t in ("1", "2")} | {"gguf_mb": e["gguf_mb"]}
               for q, e in results.get("engines", {}).items()}
    summary["engines"] = engines
    summary["shapes"] = {name: {q: {"tokens_per_s": median([r["tokens"] / r["seconds"] for r in f["warm"]]),
                                    "peak_mb": f["peak_mb"], "cold_start_s": f["cold_start_s"], "gguf_mb": f["gguf_mb"]}
                                for q, f in shape.items() if q != "hparams"}
                         for name, shape in results.get("shapes", {}).items()}
    q8 = engines.get("Q8_0", {}).get("1")
    vs_llama = q8["server"]["tokens_per_s"] / q8["llama"]["tokens_per_s"] if q8 else None
    summary["targets"] = {
        "speedup_numpy_1_thread_100": {"value": speed / NUMPY_ENGINE["tokens_per_s"] if speed else None,
                                       "target": f">= {TARGETS['speedup_numpy']}x the NumPy engine",
                                       "met": bool(speed) and speed >= TARGETS["speedup_numpy"] * NUMPY_ENGINE["tokens_per_s"]},
        "vs_llama_q8_1_thread_100": {"value": vs_llama, "target": f">= {TARGETS['vs_llama']}x llama.cpp alone",
                                     "met": vs_llama is not None and vs_llama >= TARGETS["vs_llama"]},
        "cold_start_s": {"value": ours["cold_start_s"], "target": f"<= {TARGETS['cold_start_s']}",
                         "met": ours["cold_start_s"] <= TARGETS["cold_start_s"]},
        "peak_rss_mb": {"value": ours["peak_rss_mb"], "target": f"<= {TARGETS['peak_rss_mb']}",
                        "met": ours["peak_rss_mb"] <= TARGETS["peak_rss_mb"]},
        "growth_mb_200_requests": {"value": ours["growth_mb"], "requests": ours["growth_requests"],
                                   "target": f"< {TARGETS['growth_mb']}",
                                   # None: too few requests to judge (--quick)
                                   "met": ours["growth_mb"] < TARGETS["growth_mb"] if ours["growth_requests"] >= 200
                                   else None},
    }
    summary["cost"] = cost_rows(summary)
    return summary


def memory_setting(peak_mb):
    """The smallest Cloud Run --memory (GiB) with a quarter of headroom over a measured peak."""
    return next(g for g in MEMORY_SETTINGS_GIB if g * 1024 >= peak_mb * 1.25)


def cost_1000(tokens_per_s, memory_gib, tokens=100):
    """Dollars for 1,000 requests of `tokens` tokens on 1 vCPU, billed in 100 ms steps."""
    seconds = np.ceil(tokens / tokens_per_s * 10) / 10
    return 1000 * (seconds * (PRICES["vcpu_s"] + memory_gib * PRICES["gib_s"]) + PRICES["request"])


def cost_rows(summary):
    """(name, tokens/s, peak MB, --memory GiB, $ per 1,000 generations of 100 tokens), 1 thread."""
    rows = [("gpt-2-simple, 124M", summary["baseline"]["tokens_per_s"]["1"].get("100"),
             summary["baseline"]["peak_rss_mb"])]
    rows += [(f"our server, 124M {q}", e["1"]["server"]["tokens_per_s"], e["1"]["server"]["peak_mb"])
             for q, e in summary["engines"].items()]
    rows += [(f"our server, {name} {q}", f["tokens_per_s"], f["peak_mb"])
             for name, shape in summary["shapes"].items() for q, f in shape.items()]
    return [{"name": name, "tokens_per_s": speed, "peak_mb": peak, "memory_gib": memory_setting(peak),
             "dollars": cost_1000(speed, memory_setting(peak))} for name, speed, peak in rows if speed]


def fmt(value, digits=2):
    if value is None:
        return "-"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}"


def ratio(ours, base):
    return f"{ours / base:.2f}x" if ours is not None and base else "-"


def met(summary, key):
    t = summary["targets"][key]
    return f"{t['target']}: {'not judged' if t['met'] is None else 'met' if t['met'] else 'MISSED'}"


def table(results):
    s = results["summary"]
    m = results["machine"]
    head = (f"Benchmark ({results['mode']}), {results['date']}: {m['cpu']}, {m['cores']} cores, {m['memory_gb']} GB; "
            f"Python {m['python']}, numpy {m['numpy']}, tensorflow-cpu {m['tensorflow-cpu']}, "
            f"gpt-2-simple {m['gpt-2-simple']}, llama-cpp-python {m['llama-cpp-python']}.")
    peer = peer_table(results) if "peer" in s else []
    if "contenders" not in results:
        return "\n".join([head, ""] + peer)
    return "\n".join([head] + contenders_table(results) + [""] + engines_table(s) + [""] + cost_table(s, results)
                     + ([""] + peer if peer else []))


def peer_table(results):
    s, peer = results["summary"]["peer"], results["peer"]
    hp = results["model"]["hparams"]
    rounds = len(peer["rounds"])
    lines = [f"Our server (`python -m app`) against llama-server, llama.cpp's own C++ server (bench/llama_server.sh: "
             f"the llama.cpp llama-cpp-python {results['machine']['llama-cpp-python']} vendors, the wheel's x86-64-v3 "
             f"flags), on the same GGUF file ({fmt(peer['gguf_mb'], 1)} MB, n_layer {hp['n_layer']}, n_embd "
             f"{hp['n_embd']}, n_vocab {hp['n_vocab']}, {results['model']['weights']}): 1 thread each, POST "
             f"/v1/completions, temperature 0.7 over the whole vocabulary; {rounds} interleaved round"
             f"{'s' if rounds > 1 else ''} (order swapped each round), medians; {results['settings']['repeats']} "
             "answers of 100 tokens a round.", "",
             "| figure | our server | llama-server | ours / llama-server | target |",
             "| --- | ---: | ---: | ---: | --- |"]
    for key, what, digits in [("cold_start_s", "cold start: process start to first byte of a 20-token answer (s)", 2),
                              ("peak_mb", "peak RSS (MB)", 0), ("tokens_per_s", "tokens/s, 100 tokens", 1)]:
        t = s["targets"][key]
        lines.append(f"| {what} | {fmt(s['ours'][key], digits)} | {fmt(s['llama_server'][key], digits)} "
                     f"| {t['value']:.2f}x | {t['target']}: {'met' if t['met'] else 'MISSED'} |")
        if key == "cold_start_s":
            ours, theirs = s["ours"]["cold_start_cpu_s"], s["llama_server"]["cold_start_cpu_s"]
            lines.append(f"| CPU time to that answer, all threads (s) | {fmt(ours)} | {fmt(theirs)} "
                         f"| {ratio(ours, theirs)} | |")
        if key == "tokens_per_s" and "cpu_ms_per_token" in s["ours"]:
            ours, theirs = s["ours"]["cpu_ms_per_token"], s["llama_server"]["cpu_ms_per_token"]
            lines.append(f"| CPU time per token of those answers, all threads (ms) | {fmt(ours)} | {fmt(theirs)} "
                         f"| {ratio(ours, theirs)} | |")
    lines += ["", "Round by round (ours / llama-server): " + "; ".join(
        f"{i + 1}: cold start {r['ours']['cold_start_s']:.2f} / {r['llama_server']['cold_start_s']:.2f} s, "
        f"peak {r['ours']['peak_mb']:.0f} / {r['llama_server']['peak_mb']:.0f} MB, "
        f"{r['ours']['tokens_per_s']:.1f} / {r['llama_server']['tokens_per_s']:.1f} tokens/s"
        for i, r in enumerate(s["rounds"])) + "."]
    return lines


def contenders_table(results):
    s = results["summary"]
    base, ours = s["baseline"], s["ours"]
    hp = results["model"]["hparams"]
    lines = [
        f"Model: n_layer {hp['n_layer']}, n_embd {hp['n_embd']}, n_head {hp['n_head']}, n_vocab {hp['n_vocab']}, "
        f"n_ctx {hp['n_ctx']} ({results['model']['weights']}); medians of {results['settings']['repeats']} runs "
        f"({results['settings']['cold_repeats']} for cold start).",
        "",
        "| figure | gpt-2-simple | our server | ours/baseline | target |",
        "| --- | ---: | ---: | ---: | --- |",
        f"| cold start: process start to first byte of a 20-token answer (s) | {fmt(base['cold_start_s'])} "
        f"| {fmt(ours['cold_start_s'])} | {ratio(ours['cold_start_s'], base['cold_start_s'])} | {met(s, 'cold_start_s')} |",
    ]
    for threads in ["1", "2"]:
        for n in base["latency_s"][threads]:
            lines.append(f"| latency, {n} tokens, {threads} thread{'s' if threads != '1' else ''} (s) "
                         f"| {fmt(base['latency_s'][threads][n])} | {fmt(ours['latency_s'][threads][n])} "
                         f"| {ratio(ours['latency_s'][threads][n], base['latency_s'][threads][n])} | |")
        for n in base["tokens_per_s"][threads]:
            target = ""
            if threads == "1" and n == "100":
                target = (f"{met(s, 'speedup_numpy_1_thread_100')} ({NUMPY_ENGINE['tokens_per_s']}, "
                          f"{NUMPY_ENGINE['source']})")
            lines.append(f"| tokens/s, {n} tokens, {threads} thread{'s' if threads != '1' else ''} "
                         f"| {fmt(base['tokens_per_s'][threads][n], 1)} | {fmt(ours['tokens_per_s'][threads][n], 1)} "
                         f"| {ratio(ours['tokens_per_s'][threads][n], base['tokens_per_s'][threads][n])} | {target} |")
    lines += [
        f"| RSS after load (MB) | {fmt(base['rss_after_load_mb'])} | {fmt(ours['rss_after_load_mb'])} "
        f"| {ratio(ours['rss_after_load_mb'], base['rss_after_load_mb'])} | |",
        f"| peak RSS (MB) | {fmt(base['peak_rss_mb'])} | {fmt(ours['peak_rss_mb'])} "
        f"| {ratio(ours['peak_rss_mb'], base['peak_rss_mb'])} | {met(s, 'peak_rss_mb')} |",
        f"| RSS growth over N 20-token requests (MB) | {fmt(base['growth_mb'], 1)} (N={base['growth_requests']}) "
        f"| {fmt(ours['growth_mb'], 1)} (N={ours['growth_requests']}) | | {met(s, 'growth_mb_200_requests')} (N=200) |",
        f"| RSS growth per request (MB) | {fmt(base['growth_mb_per_request'], 2)} "
        f"| {fmt(ours['growth_mb_per_request'], 3)} | | |",
        f"| early stop: tokens computed, length {results['settings']['early_stop_length']}, answer ends "
        f"with <\\|endoftext\\|> (small trained model) | {fmt(base['early_stop_tokens'], 0)} "
        f"| {fmt(ours['early_stop_tokens'], 0)} | {ratio(ours['early_stop_tokens'], base['early_stop_tokens'])} | |",
    ]
    per_token = results["model"]["weight_bytes_per_token"]
    for threads, bw in results["bandwidth_bytes_per_s"].items():
        ceiling = s["ceiling_tokens_per_s"][threads]
        fraction = s["ours_fraction_of_ceiling"][threads]["100"]
        base_fraction = s["baseline_fraction_of_ceiling"][threads]["100"]
        lines.append(f"| tokens/s ceiling, {threads} thread{'s' if threads != '1' else ''}: memory read "
                     f"{max(bw.values()) / 1e9:.1f} GB/s (numpy sum {bw['numpy_sum'] / 1e9:.1f}, BLAS gemv "
                     f"{bw['blas_gemv'] / 1e9:.1f}) / {per_token / 1e6:.1f} MB of weights per token "
                     f"| {fmt(ceiling, 1)} | {fmt(ceiling, 1)} | at 100 tokens, ours: {fraction:.0%} of it, "
                     f"gpt-2-simple: {base_fraction:.0%} | |")
    return lines


def engines_table(s):
    if not s["engines"]:
        return []
    lines = ["Every weight type of the same checkpoint: our server (HTTP) against llama.cpp's engine alone "
             "(llama-cpp-python's Llama class) on the same GGUF file; 100 tokens, medians.", "",
             "| weights | GGUF (MB) | threads | ours tokens/s | llama.cpp alone tokens/s | ours/alone "
             "| ours peak RSS (MB) | alone peak RSS (MB) | ours cold start (s) | alone cold start (s) |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for quant, e in s["engines"].items():
        for t in (t for t in ("1", "2") if t in e):
            ours, alone = e[t]["server"], e[t]["llama"]
            lines.append(f"| {quant} | {fmt(e['gguf_mb'], 1)} | {t} | {fmt(ours['tokens_per_s'], 1)} "
                         f"| {fmt(alone['tokens_per_s'], 1)} | {ratio(ours['tokens_per_s'], alone['tokens_per_s'])} "
                         f"| {fmt(ours['peak_mb'])} | {fmt(alone['peak_mb'])} | {fmt(ours['cold_start_s'])} "
                         f"| {fmt(alone['cold_start_s'])} |")
    lines.append(f"\nTarget, Q8_0 at 1 thread: ours within 10% of llama.cpp alone: {met(s, 'vs_llama_q8_1_thread_100')}.")
    for name, shape in s["shapes"].items():
        if name == list(s["shapes"])[0]:
            lines += ["", "Bigger GPT-2 shapes (random weights), our server, 1 thread, 100 tokens:", "",
                      "| shape | weights | GGUF (MB) | tokens/s | peak RSS (MB) | Cloud Run --memory | cold start (s) |",
                      "| --- | --- | ---: | ---: | ---: | --- | ---: |"]
        for quant, f in shape.items():
            lines.append(f"| {name} | {quant} | {fmt(f['gguf_mb'])} | {fmt(f['tokens_per_s'], 1)} | {fmt(f['peak_mb'])} "
                         f"| {memory_setting(f['peak_mb'])}Gi | {fmt(f['cold_start_s'])} |")
    return lines


def cost_table(s, results):
    lines = [f"Cost of 1,000 generations of 100 tokens on Cloud Run, 1 vCPU, --memory the smallest setting "
             f"with 25% over the peak, 100 ms billing steps; prices: {PRICES['source']}.", "",
             "| contender | tokens/s | peak RSS (MB) | --memory | $ per 1,000 |", "| --- | ---: | ---: | --- | ---: |"]
    lines += [f"| {r['name']} | {fmt(r['tokens_per_s'], 1)} | {fmt(r['peak_mb'])} | {r['memory_gib']}Gi "
              f"| {r['dollars']:.4f} |" for r in s["cost"]]
    if results.get("image_mb"):
        lines.append(f"\nServing image: {results['image_mb']} MB (tests/test_container.py, with a tiny model).")
    return lines


def chart(results, path):
    """Two rows of panels against gpt-2-simple, and one against llama-server (either may be absent)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    has_peer = "peer" in results["summary"]
    rows = 2 * ("contenders" in results) + has_peer
    fig = plt.figure(figsize=(12, 4.25 * rows))
    hp = results["model"]["hparams"]
    fig.suptitle(f"Our server vs {'gpt-2-simple' if rows > 1 else ''}{' and ' if rows == 3 else ''}"
                 f"{'llama-server' if has_peer else ''} ({results['mode']}, {results['date']}, "
                 f"{results['machine']['cpu']}, {results['machine']['cores']} cores; n_layer {hp['n_layer']}, "
                 f"n_embd {hp['n_embd']})")
    grid = fig.add_gridspec(rows, 6)  # six columns: two panels a row above, three in the llama-server row
    if rows > 1:
        contenders_chart(results, np.array([[fig.add_subplot(grid[r, c:c + 3]) for c in (0, 3)] for r in (0, 1)]))
    if has_peer:
        peer_chart(results, [fig.add_subplot(grid[rows - 1, c:c + 2]) for c in (0, 2, 4)])
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def peer_chart(results, axes):
    """Ours against llama-server: each round's figure as a dot, the median as the bar."""
    s = results["summary"]["peer"]
    names, colors = ["ours", "llama_server"], ["#1f77b4", "#ff7f0e"]
    labels = ["our server", "llama-server"]
    for ax, (key, title, unit) in zip(axes, [
            ("cold_start_s", "Cold start to a 20-token answer", "seconds (lower is better)"),
            ("peak_mb", "Peak RSS", "MB (lower is better)"),
            ("tokens_per_s", "Speed: 100-token answers, 1 thread", "tokens/s (higher is better)")]):
        ax.bar(labels, [s[n][key] for n in names], color=colors, alpha=0.8)
        for i, n in enumerate(names):
            ax.plot([i] * len(s["rounds"]), [r[n][key] for r in s["rounds"]], "k.", markersize=5)
        t = s["targets"][key]
        ax.set_title(f"{title}\nours / llama-server {t['value']:.2f}x (target {t['target'].split('x')[0]}x)", fontsize=9)
        ax.set_ylabel(unit)


def contenders_chart(results, axes):
    s = results["summary"]
    base, ours = s["baseline"], s["ours"]
    colors = {"baseline": "#999999", "ours": "#1f77b4"}

    ax = axes[0, 0]
    groups = [(t, n) for t in ["1", "2"] for n in base["tokens_per_s"][t]]
    x = np.arange(len(groups))
    for offset, name in [(-0.2, "baseline"), (0.2, "ours")]:
        values = [s[name]["tokens_per_s"][t][n] for t, n in groups]
        ax.bar(x + offset, values, 0.4, label=NAMES[name], color=colors[name])
    top = max(max(s[name]["tokens_per_s"][t][n] for t, n in groups) for name in ("baseline", "ours")) * 1.35
    for i, t in enumerate(["1", "2"]):
        span = [j for j, g in enumerate(groups) if g[0] == t]
        ceiling = s["ceiling_tokens_per_s"][t]
        if ceiling <= top * 1.5:
            top = max(top, ceiling * 1.1)
            ax.hlines(ceiling, span[0] - 0.45, span[-1] + 0.45, colors="red", linestyles="--",
                      label="memory-bandwidth ceiling" if i == 0 else None)
        else:  # a model small enough to sit in cache: the ceiling is meaningless, say so
            ax.text(span[1], top * 0.92, f"ceiling {ceiling:,.0f}\n(off the chart)", ha="center", fontsize=8,
                    color="red")
    ax.set_ylim(0, top)
    ax.set_xticks(x, [f"{n} tok\n{t} thr" for t, n in groups])
    ax.set_ylabel("tokens/s (higher is better)")
    ax.set_title("Warm generation speed")
    ax.legend(loc="upper left", fontsize=8)

    ax = axes[0, 1]
    names = ["baseline", "ours"]
    ax.bar([NAMES[n] for n in names], [s[n]["cold_start_s"] for n in names], color=[colors[n] for n in names])
    ax.axhline(TARGETS["cold_start_s"], color="green", linestyle=":", label=f"target {TARGETS['cold_start_s']} s")
    ax.set_ylabel("seconds (lower is better)")
    ax.set_title("Cold start: process start to first byte of a 20-token answer")
    ax.legend()

    ax = axes[1, 0]
    for name in names:
        mem = results["contenders"][name]["memory"]
        requests = [0] + [g["request"] for g in mem["growth"]]
        rss = [mem["growth_start_mb"]] + [g["rss_mb"] for g in mem["growth"]]
        ax.plot(requests, rss, label=f"{NAMES[name]} (peak {mem['peak_mb']:,.0f} MB)", color=colors[name],
                marker="o" if len(requests) < 30 else None, markersize=3)
    ax.axhline(TARGETS["peak_rss_mb"], color="green", linestyle=":", label=f"target peak {TARGETS['peak_rss_mb']} MB")
    ax.set_xlabel("20-token requests after warm-up")
    ax.set_ylabel("RSS (MB)")
    ax.set_title("Memory over repeated requests")
    ax.legend()

    ax = axes[1, 1]
    ax.bar([NAMES[n] for n in names], [s[n]["early_stop_tokens"] for n in names], color=[colors[n] for n in names])
    ax.set_ylabel("tokens computed (median)")
    ax.set_title(f"Early stop: answer ending in <|endoftext|>, length {results['settings']['early_stop_length']}")


def write_outputs(out, results, stem, make_table, make_chart):
    """STEM.json, STEM.md (make_table's text, returned) and STEM.png (make_chart's), each written to a
    temp file and renamed into place."""
    text = make_table(results)
    names = [f"{stem}.json", f"{stem}.md", f"{stem}.png"]
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        tmp = Path(tmp)
        (tmp / names[0]).write_text(json.dumps(results, indent=1) + "\n")
        (tmp / names[1]).write_text(text + "\n")
        make_chart(results, tmp / names[2])
        for name in names:
            os.replace(tmp / name, out / name)
    return text
