"""bench/steering.py --quick end to end: every control really runs over HTTP against `python -m app` (with and
without a BLOCKLIST_FILE) and in the sampler chain, on a small random model, and the table, chart and raw
figures come out sane. No timing thresholds: the machine is shared; only that every figure exists."""
import json
import subprocess
import sys
from pathlib import Path

import matplotlib.image

ROOT = Path(__file__).resolve().parent.parent


def test_quick_run_writes_table_chart_and_json(tmp_path):
    # built models are cached under tests/out/ (gitignored), shared with tests/test_bench.py
    proc = subprocess.run([sys.executable, "bench/steering.py", "--quick", "--length", "10", "--out", str(tmp_path),
                           "--models", str(ROOT / "tests" / "out" / "bench-models")],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((tmp_path / "steering.json").read_text())
    table = (tmp_path / "steering.md").read_text()
    assert table.strip() in proc.stdout
    for row in ["repetition_penalty 1.3", "bad_words, 500", "BLOCKLIST_FILE, 1,000 words", "top_k 40 (/v1)",
                "logit_bias, 10,000 entries", "llama.cpp's penalties sampler (not used)"]:
        assert row in table, row
    for name, row in results["summary"]["http"].items():
        assert row["on_tokens_per_s"] > 0 and row["off_tokens_per_s"] > 0, name
    for runs in results["http"].values():  # (random weights may draw the end token: rarely, early)
        assert all(1 <= r["on_tokens"] <= 10 and 1 <= r["off_tokens"] <= 10 for r in runs)
    assert all(us > 0 for us in results["summary"]["chain_us_per_token"].values())
    image = matplotlib.image.imread(tmp_path / "steering.png")
    assert image.shape[0] > 300 and image.shape[1] > 600 and image.std() > 0.05
