"""bench/finetune.py --quick end to end: four real `python -m finetune` runs on a small random model,
and the table, chart and raw figures come out consistent. No timing thresholds: the machine is shared."""
import hashlib
import json
import statistics
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import pytest

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "tests" / "out" / "bench-models"  # the small model is cached here, as for tests/test_bench.py


def bench(*args, timeout=300):
    return subprocess.run([sys.executable, "bench/finetune.py", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def checkpoint_digest(model):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(model.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-finetune")
    model = MODELS / "small-random"
    before = checkpoint_digest(model) if (model / "bench_model.json").exists() else None
    proc = bench("--quick", "--out", out, "--models", MODELS)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    if before:  # the runs continue hard links of the cached checkpoint: it must stay as it was
        assert checkpoint_digest(model) == before
    return out, proc.stdout, json.loads((out / "finetune.json").read_text())


def test_every_configuration_is_timed(quick):
    _, _, results = quick
    assert [(r["window"], r["accumulate"]) for r in results["runs"]] == [(1024, 5), (256, 5), (1024, 1), (256, 1)]
    assert results["mode"] == "quick" and results["steps"] == 4
    assert results["device"].startswith(("CPU", "GPU"))
    assert results["model"]["hparams"]["n_layer"] == 2
    for r in results["runs"]:
        assert len(r["step_seconds"]) == results["steps"] and all(s > 0 for s in r["step_seconds"])
        assert r["seconds_per_step"] == pytest.approx(statistics.median(r["step_seconds"][1:]))
        assert r["vs_defaults"] == pytest.approx(r["seconds_per_step"] / results["runs"][0]["seconds_per_step"])
        assert r["wall_seconds"] > sum(r["step_seconds"]) and r["load_before"] >= 0


def test_table_and_chart(quick):
    out, stdout, results = quick
    table = (out / "finetune.md").read_text()
    assert table.strip() in stdout
    rows = [line for line in table.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert len(rows) == 4
    assert rows[0].startswith("| 1,024 (defaults) | 5 | 5,120 |") and "| 1.00x |" in rows[0]
    assert rows[3].startswith("| 256 | 1 | 256 |")
    assert results["device"] in table and "load average" in table
    image = matplotlib.image.imread(out / "finetune.png")
    assert image.shape[0] > 300 and image.shape[1] > 600
    assert image.std() > 0.05  # not blank
    assert not list((out / "logs").parent.glob("tmp*"))  # no temp folders left behind


def test_bad_option_is_one_line_error(tmp_path):
    for args, words in [(["--steps", "1"], "--steps"), (["--out", tmp_path / "file"], "is a file")]:
        (tmp_path / "file").write_text("")
        proc = bench("--quick", *args, timeout=60)
        assert proc.returncode != 0
        assert "Traceback" not in proc.stderr and words in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1
