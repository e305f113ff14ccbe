"""bench/serve.py --quick end to end: every contender really runs (gpt-2-simple in TensorFlow, our
server over HTTP at each quant, llama.cpp alone) on a small random model (speed, memory) and the small
trained one (early stop), and the table, chart and raw figures come out sane.
No timing thresholds: the machine is shared; only that every figure exists and is consistent."""
import json
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def quick(tiny_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    # built models are cached under tests/out/ (gitignored) so reruns skip building them
    proc = subprocess.run([sys.executable, "bench/serve.py", "--quick", "--out", str(out), "--models",
                           str(ROOT / "tests" / "out" / "bench-models"), "--tiny-model", str(tiny_run)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout, json.loads((out / "serve.json").read_text())


def test_writes_table_chart_and_json(quick):
    out, stdout, results = quick
    table = (out / "serve.md").read_text()
    assert table.strip() in stdout
    for row in ["cold start", "tokens/s, 100 tokens, 1 thread", "peak RSS", "early stop", "ceiling"]:
        assert row in table
    image = matplotlib.image.imread(out / "serve.png")
    assert image.shape[0] > 400 and image.shape[1] > 600
    assert image.std() > 0.05  # not blank
    assert results["mode"] == "quick" and results["machine"]["cores"] >= 1


def test_speed_runs_compute_exactly_the_requested_tokens(quick):
    _, _, results = quick
    for name, contender in results["contenders"].items():
        for threads in ["1", "2"]:
            for length in ["20", "100", "500"]:
                runs = contender["warm"][threads][length]
                assert len(runs) == results["settings"]["repeats"], (name, threads, length)
                for run in runs:
                    assert run["tokens"] == int(length) and run["seconds"] > 0
    summary = results["summary"]
    for name in ["baseline", "ours"]:
        for per_length in summary[name]["tokens_per_s"].values():
            assert all(v > 0 for v in per_length.values())
        assert summary[name]["cold_start_s"] > 0


def test_memory_figures(quick):
    _, _, results = quick
    for name in ["baseline", "ours"]:
        memory = results["contenders"][name]["memory"]
        assert 10 < memory["after_load_mb"] <= memory["peak_mb"] < 20_000
        assert len(memory["growth"]) >= 1
        assert all(g["rss_mb"] <= memory["peak_mb"] for g in memory["growth"])
    assert len(results["contenders"]["ours"]["memory"]["growth"]) == results["settings"]["growth_requests"]


def test_early_stop_and_ceiling(quick):
    _, _, results = quick
    length = results["settings"]["early_stop_length"]
    base = results["contenders"]["baseline"]["early_stop"]
    ours = results["contenders"]["ours"]["early_stop"]
    assert base and all(e["tokens_computed"] == length for e in base)
    # the small trained model ends its texts: ours stops there, gpt-2-simple runs on to `length`
    assert ours and all(1 <= e["tokens_computed"] <= length for e in ours)
    assert any(e["stop_reason"] != "length" and e["tokens_computed"] < length for e in ours)
    summary = results["summary"]
    assert all(rate > 1e8 for bw in results["bandwidth_bytes_per_s"].values() for rate in bw.values())
    assert all(c > 0 for c in summary["ceiling_tokens_per_s"].values())
    assert set(summary["targets"]) == {"speedup_numpy_1_thread_100", "vs_llama_q8_1_thread_100", "cold_start_s",
                                       "peak_rss_mb", "growth_mb_200_requests"}


def test_every_quant_against_llama_alone_and_cost(quick):
    out, _, results = quick
    engines = results["summary"]["engines"]
    assert list(engines) == ["Q8_0", "F16", "Q5_K_M", "Q4_K_M"]
    for quant, e in engines.items():
        for threads in ("1",):  # --quick: 1 thread only
            for kind in ("server", "llama"):
                assert e[threads][kind]["tokens_per_s"] > 0 and e[threads][kind]["peak_mb"] > 10, (quant, kind)
            runs = results["engines"][quant][threads]["llama"]["warm"]
            assert [r["tokens"] for r in runs] == [100] * results["settings"]["repeats"]
    costs = results["summary"]["cost"]
    assert [c["name"] for c in costs][:2] == ["gpt-2-simple, 124M", "our server, 124M Q8_0"]
    assert all(c["dollars"] > 0 and c["memory_gib"] >= 0.5 for c in costs)
    table = (out / "serve.md").read_text()
    assert "llama.cpp alone" in table and "$ per 1,000" in table


def test_bad_option_is_one_line_error(tmp_path):
    proc = subprocess.run([sys.executable, "bench/serve.py", "--quick", "--out", str(tmp_path),
                           "--tiny-model", str(tmp_path / "missing")], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr and "--tiny-model" in proc.stderr
    assert not (tmp_path / "serve.json").exists()


@pytest.mark.parametrize("args, message", [
    (["--llama-server", "/nonexistent/llama-server"], "--llama-server /nonexistent/llama-server is not an executable"),
    (["--llama-server-only"], "--llama-server-only with --quick needs --llama-server PATH"),
])
def test_bad_llama_server_option_is_one_line_error(tmp_path, args, message):
    proc = subprocess.run([sys.executable, "bench/serve.py", "--quick", "--out", str(tmp_path), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr and message in proc.stderr
    assert not (tmp_path / "serve.json").exists()


def test_scoring_bench_writes_its_table_chart_and_json(tmp_path):
    """bench/scoring.py --quick: every mode timed, both peaks measured (no timing thresholds)."""
    proc = subprocess.run([sys.executable, "bench/scoring.py", "--quick", "--repeats", "1", "--out", str(tmp_path),
                           "--models", str(ROOT / "tests" / "out" / "bench-models")],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((tmp_path / "scoring.json").read_text())
    assert list(results["times"]) == ["forward pass only", "logprobs 0", "logprobs 5"]
    assert all(len(t["cpu"]) == len(t["wall"]) == 1 and t["wall"][0] > 0 for t in results["times"].values())
    assert all(m["peak"] >= m["before"] > 0 for m in results["memory"].values()) and len(results["memory"]) == 2
    assert (tmp_path / "scoring.md").read_text().strip() in proc.stdout
    assert matplotlib.image.imread(tmp_path / "scoring.png").shape[2] in (3, 4)
