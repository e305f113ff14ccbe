"""Medians, the table (markdown) and the chart (PNG) of bench/serve.py's raw figures."""
import numpy as np

NAMES = {"baseline": "gpt-2-simple", "ours": "our server"}
TARGETS = {"tokens_per_s": 30, "speedup": 3, "cold_start_s": 1.5, "peak_rss_mb": 700, "growth_mb": 5}


def median(values):
    return float(np.median(values)) if len(values) else None


def summarize(results):
    """Medians per contender, the bandwidth ceiling, and each target met or missed."""
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
    summary["targets"] = {
        "tokens_per_s_1_thread_100": {"value": speed, "target": f">= {TARGETS['tokens_per_s']}",
                                      "met": speed is not None and speed >= TARGETS["tokens_per_s"]},
        "speedup_1_thread_100": {"value": speed / base["tokens_per_s"]["1"]["100"] if speed else None,
                                 "target": f">= {TARGETS['speedup']}",
                                 "met": bool(speed) and speed >= TARGETS["speedup"] * base["tokens_per_s"]["1"]["100"]},
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
    return summary


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
    base, ours = s["baseline"], s["ours"]
    m, hp = results["machine"], results["model"]["hparams"]
    lines = [
        f"Benchmark ({results['mode']}), {results['date']}: {m['cpu']}, {m['cores']} cores, {m['memory_gb']} GB; "
        f"Python {m['python']}, numpy {m['numpy']}, tensorflow-cpu {m['tensorflow-cpu']}, "
        f"gpt-2-simple {m['gpt-2-simple']}.",
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
                speedup = s["targets"]["speedup_1_thread_100"]
                target = (f"{met(s, 'tokens_per_s_1_thread_100')}; >= {TARGETS['speedup']}x baseline: "
                          f"{'met' if speedup['met'] else 'MISSED'}")
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
    return "\n".join(lines)


def chart(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = results["summary"]
    base, ours = s["baseline"], s["ours"]
    colors = {"baseline": "#999999", "ours": "#1f77b4"}
    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    hp = results["model"]["hparams"]
    fig.suptitle(f"Our server vs gpt-2-simple ({results['mode']}, {results['date']}, {results['machine']['cpu']}, "
                 f"{results['machine']['cores']} cores; n_layer {hp['n_layer']}, n_embd {hp['n_embd']})")

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
    ax.axhline(1.5, color="green", linestyle=":", label="target 1.5 s")
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
    ax.axhline(700, color="green", linestyle=":", label="target peak 700 MB")
    ax.set_xlabel("20-token requests after warm-up")
    ax.set_ylabel("RSS (MB)")
    ax.set_title("Memory over repeated requests")
    ax.legend()

    ax = axes[1, 1]
    ax.bar([NAMES[n] for n in names], [s[n]["early_stop_tokens"] for n in names], color=[colors[n] for n in names])
    ax.set_ylabel("tokens computed (median)")
    ax.set_title(f"Early stop: answer ending in <|endoftext|>, length {results['settings']['early_stop_length']}")

    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
