"""python -m finetune's memory and precision options (issue 21), by real training runs of a tiny
from-scratch model: --train-layers, --optimizer, --recompute, --precision, and the fit check.

One run (`base`, 1 step, float32) is the starting point; each test continues copies of it with the
option under test, so every comparison starts from the same weights and the same windows (--seed).
"""
import csv
import re
import shlex
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, TINY_MODEL_ARGS, run_finetune, write_corpus
from test_finetune_cloud import bucket, cloud  # noqa: F401 (fixture: an emulator bucket)

STEP_ARGS = ["--sample-every", "0", "--save-every", "0", "--seed", "3", "--learning-rate", "0.01"]
BLOCK_VARS = re.compile(r"model/h\d+/")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A from-scratch run at step 1 (float32, Adam) and its corpus."""
    root = tmp_path_factory.mktemp("options")
    corpus = write_corpus(root / "corpus.txt")
    result = run_finetune("--dataset", corpus, "--checkpoint-dir", root, "--run-name", "base",
                          *TINY_MODEL_ARGS, "--steps", "1", "--accumulate-gradients", "1",
                          "--precision", "fp32", *STEP_ARGS)
    assert result.returncode == 0, result.stderr
    return root / "base", corpus


def continue_run(base, name, *args, steps=1):
    """Copy the base run to `name` and train it `steps` more steps with args; (run dir, stdout)."""
    run_dir, corpus = base
    dest = run_dir.parent / name
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(run_dir, dest)
    result = run_finetune("--dataset", corpus, "--checkpoint-dir", dest.parent, "--run-name", name,
                          *TINY_MODEL_ARGS, "--steps", steps, *STEP_ARGS, *args)
    assert result.returncode == 0, result.stderr
    return dest, result.stdout


def error_line(result):
    """The one line of a refusal; above it only TensorFlow's start-up log (absl prints it whatever
    the log level, e.g. oneDNN's banner)."""
    *above, line = result.stderr.strip().splitlines()
    assert all(a.startswith(("WARNING: All log messages", "I0000 ")) for a in above), result.stderr
    return line


def weights(run_dir):
    """{name: array} of the run's latest checkpoint, and the checkpoint's dtypes."""
    import tensorflow as tf
    reader = tf.train.load_checkpoint(str(run_dir))
    dtypes = reader.get_variable_to_dtype_map()
    return {n: reader.get_tensor(n) for n in dtypes}, {n: d.name for n, d in dtypes.items()}


def losses(run_dir):
    with open(run_dir / "loss.csv", newline="") as f:
        return {int(r["step"]): float(r["loss"]) for r in csv.DictReader(f)}


def graph_nodes(run_dir, step):
    """The node names of the training graph saved with model-<step> (its .meta)."""
    from tensorflow.core.protobuf import meta_graph_pb2
    meta = meta_graph_pb2.MetaGraphDef()
    meta.ParseFromString((run_dir / f"model-{step}.meta").read_bytes())
    return {n.name for n in meta.graph_def.node}


def test_train_layers_transformer_trains_only_the_blocks(base):
    before, _ = weights(base[0])
    run_dir, _ = continue_run(base, "transformer", "--train-layers", "transformer", "--precision", "fp32",
                              "--accumulate-gradients", "2")
    after, dtypes = weights(run_dir)
    assert sorted(after) == sorted(before)  # the same checkpoint, variable for variable
    for name in before:
        changed = not np.array_equal(before[name], after[name])
        assert changed == bool(BLOCK_VARS.match(name)), name
    nodes = graph_nodes(run_dir, 2)
    assert "model/h0/attn/c_attn/w/Adam" in nodes
    assert not {"model/wte/Adam", "model/wpe/Adam", "model/ln_f/g/Adam"} & nodes  # no state for frozen ones


def test_sgd_keeps_no_slots_and_steps_by_the_gradient(base):
    run_dir, _ = continue_run(base, "sgd", "--optimizer", "sgd", "--precision", "fp32",
                              "--accumulate-gradients", "1")
    nodes = graph_nodes(run_dir, 2)
    assert not [n for n in nodes if n.endswith(("/Adam", "/Adam_1")) or "beta1_power" in n]
    assert "GradientDescent" in {n.split("/")[0] for n in nodes}
    before, _ = weights(base[0])
    after, _ = weights(run_dir)
    assert all(not np.array_equal(before[n], after[n]) for n in before)  # every weight trained
    # and a resumed run may switch back to Adam: the checkpoint holds only the weights
    continue_run((run_dir, base[1]), "sgd-then-adam", "--optimizer", "adam", "--precision", "fp32")


@pytest.mark.parametrize("accumulate", ["1", "2"])
def test_recompute_gives_the_same_loss_and_gradients(base, accumulate):
    """One SGD step from the same weights on the same windows: w' = w - lr * g, so equal weights
    after it mean equal gradients."""
    start, _ = weights(base[0])
    runs = {}
    for recompute in ([], ["--recompute"]):
        run_dir, _ = continue_run(base, f"rc{accumulate}{len(recompute)}", "--optimizer", "sgd",
                                  "--precision", "fp32", "--accumulate-gradients", accumulate, *recompute)
        runs[bool(recompute)] = run_dir
    plain, recomputed = (weights(runs[k])[0] for k in (False, True))
    assert losses(runs[True])[2] == pytest.approx(losses(runs[False])[2], rel=1e-5)
    for name in start:
        g_plain, g_recomputed = start[name] - plain[name], start[name] - recomputed[name]
        assert np.abs(g_plain).max() > 0, name
        np.testing.assert_allclose(g_recomputed, g_plain, rtol=1e-3, atol=1e-6 * np.abs(g_plain).max(),
                                   err_msg=name)


def test_bf16_trains_and_moves_between_precisions(base):
    """fp32 -> bf16 -> fp32 through the same checkpoints, which stay float32. On a CPU without bfloat16
    (plain AVX2: no AMX, no AVX512-BF16) what --precision bf16 guarantees is a one-line refusal."""
    from finetune.precision import cpu_has_bf16
    if not cpu_has_bf16():
        run_dir, corpus = base
        result = run_finetune("--dataset", corpus, "--checkpoint-dir", run_dir.parent, "--run-name", run_dir.name,
                              *TINY_MODEL_ARGS, "--steps", 1, *STEP_ARGS, "--precision", "bf16")
        assert result.returncode == 2 and result.stderr.strip().count("\n") == 0, result.stderr
        assert "--precision bf16 needs a CPU with AMX or AVX512-BF16" in result.stderr
        return
    run_dir, out = continue_run(base, "bf16", "--precision", "bf16", "--accumulate-gradients", "1", steps=3)
    assert "in bfloat16" in out
    _, dtypes = weights(run_dir)
    assert set(dtypes.values()) == {"float32"}
    run_dir, out = continue_run((run_dir, base[1]), "bf16-fp32", "--precision", "fp32",
                                "--accumulate-gradients", "1", steps=3)
    assert "in float32" in out
    rows = losses(run_dir)
    assert sorted(rows) == list(range(1, 8)) and all(np.isfinite(list(rows.values())))
    assert rows[7] < rows[1]  # it learns across the switches
    # the same 3 steps in float32 from the same start: bf16's losses within 2%
    fp32_dir, _ = continue_run(base, "fp32", "--precision", "fp32", "--accumulate-gradients", "1", steps=3)
    bf16 = losses(run_dir.parent / "bf16")
    for step in (2, 3, 4):
        assert bf16[step] == pytest.approx(losses(fp32_dir)[step], rel=0.02), step
    assert bf16[4] != losses(fp32_dir)[4]  # bfloat16 arithmetic did run (oneDNN on, the rewrite applied)


def test_auto_precision_says_which_on_this_machine(base):
    from finetune.precision import cpu_has_bf16
    _, out = continue_run(base, "auto", "--accumulate-gradients", "1")
    want = "bfloat16" if cpu_has_bf16() else "float32"
    assert re.search(rf"^Training on CPU, \d+ threads in {want}", out, re.M), out


def test_fp16_is_refused_without_a_gpu(base):
    run_dir, corpus = base
    result = run_finetune("--dataset", corpus, "--checkpoint-dir", run_dir.parent, "--run-name", "base",
                          *TINY_MODEL_ARGS, "--precision", "fp16")
    assert result.returncode == 2
    assert error_line(result) == ("error: --precision fp16 needs a GPU of compute capability 7.0 or more "
                                     "(TensorFlow's float16 rewrite runs only there): use --precision auto")


# -- the float16 graph, built and run on the CPU ---------------------------------------------------
FP16_GRAPH = r"""
import json, sys
import numpy as np
import tensorflow as tf
from finetune import device, optimizer, train
from finetune.__main__ import build_parser

run_dir, accumulate = sys.argv[1], sys.argv[2]
args = build_parser().parse_args(["--dataset", "x", "--sample-every", "0", "--accumulate-gradients", accumulate,
                                  "--precision", "fp16", "--seed", "1"])
trainer = train.Trainer(args, run_dir, work_dir=run_dir, init_from=None)
trainer.hparams, trainer.window, trainer.precision = train.read_hparams(run_dir), 64, "fp16"
trainer.build()
graph = tf.compat.v1.get_default_graph()
ops = {op.type for op in graph.get_operations()}
consts = [float(v) for op in graph.get_operations() if op.type == "Const"
          for v in np.ravel(tf.make_ndarray(op.get_attr("value"))) if op.get_attr("dtype") == tf.float32]
rewrite = device.start_session("fp16")._config.graph_options.rewrite_options.auto_mixed_precision
trainer.saver.restore(trainer.sess, tf.train.latest_checkpoint(run_dir))
sess, scale = trainer.sess, trainer.loss_scale
batch = {trainer.context: np.random.RandomState(0).randint(0, trainer.hparams.n_vocab, size=(1, 64))}

def step():
    if accumulate != "1":
        sess.run(trainer.opt_reset)
        for _ in range(int(accumulate)):
            sess.run(trainer.opt_compute, feed_dict=batch)
        return sess.run(trainer.opt_apply)
    return sess.run(trainer.opt_apply, feed_dict=batch)

wte = next(v for v in tf.compat.v1.global_variables() if v.name == "model/wte:0")
w0 = sess.run(wte)
step()
w1, s1, skipped1 = sess.run([wte, scale.scale, scale.skipped])
sess.run(scale.scale.assign(np.inf))  # the scaled gradients overflow
step()
w2, s2, skipped2 = sess.run([wte, scale.scale, scale.skipped])
sess.run([scale.scale.assign(4.0), scale.good_steps.assign(optimizer.GROW_EVERY - 1)])
step()
w3, s3, skipped3 = sess.run([wte, scale.scale, scale.skipped])
print(json.dumps({"ops": sorted(ops), "max_const": max(consts), "rewrite": rewrite,
                  "first": [bool((w0 != w1).any()), float(s1), bool(skipped1)],
                  "overflow": [bool((w1 != w2).any()), float(s2), bool(skipped2)],
                  "grow": [bool((w2 != w3).any()), float(s3), bool(skipped3)]}))
"""


@pytest.mark.parametrize("accumulate", ["1", "5"])
def test_fp16_graph_has_dynamic_loss_scaling_that_skips_an_overflowing_step(base, accumulate):
    """The GPU path's graph, checked here: the float16 rewrite is switched on, the attention mask
    is float16-safe, and loss scaling covers both gradient paths: a finite step trains, a step
    whose scaled gradients overflow leaves the weights as they were, and GROW_EVERY good steps
    double the scale."""
    import json
    result = subprocess.run([sys.executable, "-c", FP16_GRAPH, str(base[0]), accumulate], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["rewrite"] == 1  # RewriterConfig.ON
    assert {"IsFinite", "If"} <= set(out["ops"]) or {"IsFinite", "StatelessIf"} <= set(out["ops"])
    assert out["max_const"] < 65504  # no 1e10 mask: float16's largest is 65504
    assert out["first"] == [True, 2.0 ** 15, False]
    assert out["overflow"] == [False, float("inf"), True]  # inf / 2
    assert out["grow"] == [True, 8.0, False]


# -- the fit check ---------------------------------------------------------------------------------
def test_fit_one_liners_for_the_l4():
    from finetune import UsageError, fit
    lines = {}
    for model in ("774M", "1558M"):
        with pytest.raises(UsageError) as e:
            fit.check(fit.release_shape(model), fit.Options(precision="fp16"), fit.L4_MEMORY, "the L4",
                      name=model)
        lines[model] = str(e.value)
    assert re.fullmatch(r"774M \(Adam, all weights, fp16, 1 x 1,024 tokens\) needs ~\d+\.\d GiB, the L4 gives "
                        r"TensorFlow ~20\.6 GiB: add --recompute \(~\d+\.\d GiB\)", lines["774M"])
    assert re.fullmatch(r"1558M \(.*\) needs ~\d+\.\d GiB, the L4 gives TensorFlow ~20\.6 GiB: add "
                        r"--recompute( --\S+ \S+)+ \(~\d+\.\d GiB\)", lines["1558M"])
    # what it names does fit, and each flag of it is needed
    for model, line in lines.items():
        flags = line.split(": add ")[1].split(" (~")[0].split()
        o = fit.Options(precision="fp16", recompute="--recompute" in flags,
                        optimizer="sgd" if "sgd" in flags else "adam",
                        train_layers="transformer" if "transformer" in flags else "all",
                        accumulate=1 if "--accumulate-gradients" in flags else 5)
        assert fit.needed(fit.release_shape(model), o) <= fit.L4_MEMORY
    assert fit.needed(fit.release_shape("124M"), fit.Options(precision="fp16")) < fit.L4_MEMORY


@pytest.mark.parametrize("shape,name", [(["--n-layer", "36", "--n-embd", "1280", "--n-head", "20"], "774M"),
                                        (["--n-layer", "48", "--n-embd", "1600", "--n-head", "25"], "1558M")])
def test_fit_one_liner_on_this_machine(tmp_path, shape, name):
    """The real CLI with a from-scratch model of the release's shape (its vocabulary is the
    corpus's): refused before anything is built, exit 2, one line naming the fix."""
    corpus = write_corpus(tmp_path / "corpus.txt")
    result = run_finetune("--dataset", corpus, "--checkpoint-dir", tmp_path, "--from-scratch", *shape,
                          "--vocab-size", "1000")
    assert result.returncode == 2, result.stderr
    line = error_line(result)
    assert re.fullmatch(r"error: a \d+M-parameter model \(Adam, all weights, (bf16|fp32), 1 x 1,024 tokens\) "
                        r"needs ~[\d.]+ GiB, this machine gives TensorFlow ~[\d.]+ GiB: add .+ \(~[\d.]+ GiB\)|"
                        r"error: .* fits: use a smaller --model", line), line
    assert not list(tmp_path.glob("run1*")) and not list(tmp_path.glob(".run1*"))


def test_cloud_checks_the_fit_before_building_and_passes_the_flags_on(bucket):  # noqa: F811
    b, env = bucket
    common = ["--bucket", b.name, "--dataset", f"gs://{b.name}/corpus.txt", "--project", "my-project", "--dry-run"]
    refused = cloud(*common, "--model", "774M", env=env)
    assert refused.returncode == 2 and refused.stdout == ""
    assert re.fullmatch(r"error: 774M \(Adam, all weights, fp16, 1 x 1,024 tokens\) needs ~[\d.]+ GiB, the L4 "
                        r"gives TensorFlow ~20\.6 GiB: add --recompute \(~[\d.]+ GiB\)\n", refused.stderr)
    ok = cloud(*common, "--model", "774M", "--recompute", "--optimizer", "sgd", "--train-layers", "transformer",
               "--precision", "fp32", env=env)
    assert ok.returncode == 0, ok.stderr
    deploy = next(line for line in ok.stdout.splitlines() if line.startswith("gcloud run jobs deploy"))
    job_args = next(a for a in shlex.split(deploy) if a.startswith("--args="))[len("--args="):]
    job_args = job_args[3:].split(job_args[1])  # gcloud's ^DELIM^ list syntax
    for flag, value in (("--optimizer", "sgd"), ("--train-layers", "transformer"), ("--precision", "fp32")):
        assert job_args[job_args.index(flag) + 1] == value
    assert "--recompute" in job_args
    bf16 = cloud(*common, "--precision", "bf16", env=env)
    assert bf16.returncode == 2 and "--precision bf16 needs a CPU" in bf16.stderr
