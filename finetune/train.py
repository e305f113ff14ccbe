"""The fine-tuning loop behind `python -m finetune`.

It builds exactly what gpt_2_simple.finetune builds -- gpt-2-simple's own model, loss, Adam with
gradient accumulation, a Saver over the model/ variables -- and writes the same run folder
(model-N.*, checkpoint, counter, hparams.json, encoder.json, vocab.bpe), so a run made in the usual
Colab notebook continues here and ours continues there. The loop itself is ours because
gpt_2_simple.finetune cannot show a progress bar, write loss.csv, put samples in the run folder,
stop cleanly on SIGTERM, or train models with fewer than 1024 positions.
"""
import json
import math
import os
import random
import re
import shutil
import signal
import sys
import time
import zipfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import tensorflow as tf
from gpt_2_simple.src import encoder, model, sample
from gpt_2_simple.src.accumulate import AccumulatingOptimizer
from gpt_2_simple.src.load_dataset import Sampler, load_dataset
from tqdm import tqdm

from finetune import (UsageError, blocks, checkpoints, fit, loss_log, optimizer, precision, recompute, text_format,
                      validation)
from finetune.device import Device, start_session
from finetune.files import atomic_write_text, partial_dir, replace_dir

# gpt-2-simple's modules are TF1 graph code (placeholders, sessions); TF 2 starts in eager mode.
tf.compat.v1.disable_eager_execution()
tf.get_logger().setLevel("ERROR")  # TF's deprecation notices are not news to the user

TOKENIZER_FILES = ["hparams.json", "encoder.json", "vocab.bpe"]
ESTIMATE_AFTER = 3  # steps before the time-left estimate (the first one is not typical)
FP16_RETRIES = 10  # float16 steps whose loss overflowed before it counts as diverged


class TrainingFailed(Exception):
    """Training stopped on an error it cannot go past (a diverged loss, memory, disk); nothing was
    saved after the last good checkpoint. Printed as one line, exit status 1."""


class Interrupted(Exception):
    """Training stopped on SIGINT/SIGTERM after saving; carries the signal number."""

    def __init__(self, signum, saved):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.saved = saved


def read_hparams(folder):
    hparams = model.default_hparams()
    with open(os.path.join(folder, "hparams.json"), encoding="utf-8") as f:
        hparams.override_from_dict(json.load(f))
    return hparams


def read_text(path):
    """The dataset's text, read as gpt-2-simple's load_dataset reads it."""
    paths = [path] if os.path.isfile(path) else sorted(
        os.path.join(d, f) for d, _, files in os.walk(path) for f in files)
    parts = []
    for p in paths:
        with open(p, encoding="utf-8", errors="ignore") as f:
            parts.append(f.read())
    return "<|endoftext|>".join(parts)


def duration(seconds):
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600} h {seconds % 3600 // 60} min"
    if seconds >= 60:
        return f"{seconds // 60} min"
    return f"{seconds} s"


def faster_options(device, n_params, seconds_left, args, window):
    """The one-line hint for a long CPU run of a real-sized model, or None."""
    if device.gpu or n_params < 100e6 or seconds_left <= 3600:
        return None
    options = ["a GPU (make setup-gpu)", "a Cloud Run GPU job (python -m finetune.cloud)"]
    if args.accumulate_gradients > 1:
        options.append(f"--accumulate-gradients 1 (1/{args.accumulate_gradients} the windows per step)")
    if window > 256:
        options.append(f"--window 256 (about 1/{window // 256} the time per step)")
    return "Faster: " + ", ".join(options)


def run(args, after_save=None):
    """Fine-tune per the parsed command line; return the run folder. Raises Interrupted after a
    Ctrl-C/SIGTERM save, TrainingFailed when it cannot go on. after_save(run_dir) runs after
    every checkpoint (e.g. an upload)."""
    run_dir = os.path.abspath(os.path.join(args.checkpoint_dir, args.run_name))
    latest = checkpoints.own(run_dir)[0] if args.restore_from == "latest" else None
    if latest:
        # Resume in place: every write below is a new file or an atomic replace, and the Saver
        # deletes the previous checkpoint only after the new one is complete.
        check_resume_shape(run_dir, args)
        return Trainer(args, run_dir, work_dir=run_dir, init_from=latest, after_save=after_save).train()

    # A new run (or --restore-from fresh) is built in a hidden work folder that takes the run's
    # name at its first complete checkpoint; a failure before that leaves nothing behind.
    if args.restore_from == "latest" and os.path.isdir(run_dir) and os.listdir(run_dir):
        raise UsageError(f"{run_dir} exists but holds no checkpoint to continue: "
                         "use --restore-from fresh to replace it or another --run-name")
    work_dir = partial_dir(os.path.dirname(run_dir), args.run_name)
    try:
        if args.from_scratch:
            init_from = None
            write_scratch_files(args, work_dir)
        else:
            from finetune.download import ensure_model
            base = ensure_model(args.model_dir, args.model, args.model_url)
            for name in TOKENIZER_FILES:
                shutil.copyfile(os.path.join(base, name), os.path.join(work_dir, name))
            init_from = checkpoints.own(base)[0]
        return Trainer(args, run_dir, work_dir=work_dir, init_from=init_from, after_save=after_save).train()
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)  # gone already once promoted


def check_resume_shape(run_dir, args):
    if not args.from_scratch:
        return
    hp = read_hparams(run_dir)
    have = (hp.n_layer, hp.n_embd, hp.n_head)
    want = (args.n_layer, args.n_embd, args.n_head)
    if have != want:
        raise UsageError(
            f"{run_dir} holds a model with n_layer/n_embd/n_head {have}, not {want}: "
            "use --restore-from fresh to replace it or another --run-name")


def write_scratch_files(args, work_dir):
    """Tokenizer from the dataset and hparams.json for a randomly initialised model."""
    from finetune.tokenizer import train_tokenizer
    print(f"Training a byte-level BPE tokenizer (up to {args.vocab_size} tokens) on {args.dataset}")
    n_vocab = train_tokenizer(read_text(args.dataset), args.vocab_size, work_dir)
    hparams = {"n_vocab": n_vocab, "n_ctx": args.n_ctx, "n_embd": args.n_embd,
               "n_head": args.n_head, "n_layer": args.n_layer}
    atomic_write_text(os.path.join(work_dir, "hparams.json"), json.dumps(hparams, indent=2) + "\n")
    print(f"Random model: {hparams}")


class Trainer:
    def __init__(self, args, run_dir, work_dir, init_from, after_save=None):
        self.args = args
        self.after_save = after_save
        self.run_dir = run_dir
        self.dir = work_dir  # becomes run_dir once promoted
        self.init_from = init_from
        self.rows = []  # loss.csv rows: step, loss, avg_loss, seconds_per_step, val_loss (or None)
        self.stop_signal = None
        self.best = None  # the lowest validation loss: {"checkpoint", "step", "val_loss"} (best.json)

    # -- setup ---------------------------------------------------------------------------------
    def load_data(self):
        args = self.args
        self.enc = encoder.get_encoder(self.dir)
        self.hparams = read_hparams(self.dir)
        n_ctx = self.hparams.n_ctx
        self.window = args.window or n_ctx  # gpt-2-simple's windows are n_ctx (1024) tokens
        if self.window > n_ctx:
            raise UsageError(f"--window {self.window} is above the model's n_ctx {n_ctx}")
        self.device = Device()
        self.precision, why = precision.choose(args.precision, self.device.capability)
        print(f"Training on {self.device} in {precision.describe(self.precision)} ({why})")
        fit.check(self.hparams, fit.Options.from_args(args, self.window, self.precision), self.device.memory,
                  "this GPU" if self.device.gpu else "this machine", cpu=not self.device.gpu,
                  name=None if args.from_scratch else args.model)
        # A resume reads (and checks) every record of the run before it writes any.
        self.best = checkpoints.read_best(self.dir) if self.dir == self.run_dir else None
        print(f"Loading dataset {args.dataset}")
        text = None if is_npz(args.dataset) else read_text(args.dataset)
        val_text = read_text(args.val_dataset) if args.val_dataset else None
        self.split, self.val_windows = validation.plan(args, text, val_text, self.enc, self.window, self.dir,
                                                       self.hparams)
        if self.val_windows is None and args.early_stop:
            print(f"warning: --early-stop {args.early_stop} does nothing: validation is off", file=sys.stderr)
        try:
            if self.split and self.split.text is not None:
                chunks = [np.array(self.enc.encode(self.split.text), dtype=np.int32)]
            else:
                chunks = load_dataset(self.enc, args.dataset, combine=50000)
        except (ValueError, zipfile.BadZipFile) as e:  # a .npz that is not one
            raise UsageError(f"dataset {args.dataset} cannot be read: {first_line(e)}") from None
        check_token_ids(chunks, self.hparams.n_vocab, args.dataset)
        total = sum(len(c) for c in chunks)
        if not chunks or self.window >= total // len(chunks):
            raise UsageError(
                f"dataset {args.dataset} is too small: {total} tokens, and training needs more than "
                f"{self.window} per window")
        self.sampler = Sampler(chunks)
        print(f"dataset has {total} tokens")
        if self.val_windows is not None:
            validation.record(self.dir, self.split.hashes, self.val_windows, self.split.info)
        text_format.write(self.dir, args.dataset, text)

    def build(self):
        args, hparams = self.args, self.hparams
        tf.compat.v1.reset_default_graph()
        if args.seed is not None:
            random.seed(args.seed)  # gpt-2-simple's Sampler draws windows with `random`
            np.random.seed(args.seed)
            tf.compat.v1.set_random_seed(args.seed)
        self.context = tf.compat.v1.placeholder(tf.int32, [args.batch_size, None])
        # gpt-2-simple's graph, or the same built block by block (--recompute; float16's mask)
        own_graph = args.recompute or self.precision == "fp16"
        output = (blocks.model if own_graph else model.model)(hparams=hparams, X=self.context)
        self.loss = tf.reduce_mean(input_tensor=tf.nn.sparse_softmax_cross_entropy_with_logits(
            labels=self.context[:, 1:], logits=output["logits"][:, :-1]))
        # Each window's mean loss, for validation (only computed when fetched).
        self.window_loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(
            labels=self.context[:, 1:], logits=output["logits"][:, :-1]), axis=1)
        if args.sample_every > 0:
            with blocks.in_sampler(self.precision == "fp16"):
                self.tf_sample = sample.sample_sequence(
                    hparams=hparams, length=min(args.sample_length, hparams.n_ctx - 1),
                    context=self.context, batch_size=args.batch_size, temperature=1.0, top_k=40)

        all_vars = [v for v in tf.compat.v1.trainable_variables() if "model" in v.name]
        train_vars = optimizer.trained_variables(all_vars, args.train_layers)
        self.loss_scale = optimizer.LossScale() if self.precision == "fp16" else None
        opt = optimizer.Optimizer(
            args.optimizer, args.learning_rate, loss_scale=self.loss_scale,
            gradients=(lambda loss, xs: recompute.gradients(loss, xs, output, hparams)) if args.recompute else None)
        if args.accumulate_gradients > 1:
            opt = AccumulatingOptimizer(opt=opt, var_list=train_vars)
            self.opt_reset = opt.reset()
            self.opt_compute = opt.compute_gradients(self.loss)
            self.opt_apply = opt.apply_gradients()
        else:
            self.opt_apply = opt.apply_gradients(opt.compute_gradients(self.loss, train_vars))

        self.all_finite = tf.reduce_all(input_tensor=[
            tf.reduce_all(input_tensor=tf.math.is_finite(v)) for v in all_vars])
        self.n_params = sum(int(np.prod(v.shape)) for v in all_vars)
        # Relative paths in the `checkpoint` file ("model-200"), as in Colab runs: the folder can move.
        self.saver = tf.compat.v1.train.Saver(
            var_list=all_vars, max_to_keep=args.max_checkpoints, save_relative_paths=True)
        self.sess = start_session(self.precision)
        self.sess.run(tf.compat.v1.global_variables_initializer())

    def restore(self):
        self.start = 0
        if self.init_from is None:
            print("Starting from random weights")
            return
        print(f"Loading checkpoint {self.init_from}")
        try:
            self.saver.restore(self.sess, self.init_from)
        except (tf.errors.OpError, ValueError) as e:
            raise UsageError(f"cannot load checkpoint {self.init_from}: {first_line(e)}") from None
        if self.dir == self.run_dir:  # resuming: continue the counter and the loss curve
            self.start = checkpoints.step(self.init_from)
            # The Saver prunes (deletes) what it recovers: only this folder's own files.
            self.saver.recover_last_checkpoints(checkpoints.own(self.dir)[1])
            self.rows = [r for r in loss_log.read(self.dir) if r[0] <= self.start]

    # -- the loop ------------------------------------------------------------------------------
    def train(self):
        self.load_data()
        self.build()
        self.restore()
        args = self.args
        end = args.until_step or (self.start + args.steps if args.steps > 0 else None)
        if end is not None and end <= self.start:
            self.sess.close()
            print(f"{self.run_dir} is at step {self.start} already: nothing to train (--until-step {end})")
            return self.run_dir
        step = self.start
        avg = (0.0, 0.0)  # gpt-2-simple's running average: decayed sum, decayed count
        previous = {s: signal.signal(s, self.request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
        bar = tqdm(total=end and end - self.start, unit="step", desc=args.run_name,
                   dynamic_ncols=True)
        last_saved = None
        val_every = args.val_every or args.sample_every  # 0: only at the end
        val_note = ""
        try:
            started = time.time()
            while end is None or step < end:
                if self.stop_signal:
                    break
                loss = self.train_step(step + 1)
                step += 1
                if step - self.start == 1:
                    first_done = time.time()  # the first step also pays for TensorFlow's warm-up
                if step - self.start == ESTIMATE_AFTER and step != end:
                    self.estimate((time.time() - first_done) / (ESTIMATE_AFTER - 1), end and end - step)
                avg = (avg[0] * 0.99 + loss, avg[1] * 0.99 + 1.0)
                seconds = (time.time() - started) / (step - self.start)
                val_loss = None
                if self.val_windows is not None and (step == end or val_every and step % val_every == 0):
                    val_loss, val_seconds = self.validate()
                    val_note = f" val={val_loss:.3f} ({val_seconds:.3g}s)"
                self.rows.append((step, loss, avg[0] / avg[1], seconds, val_loss))
                bar.set_postfix_str(
                    f"step={step} loss={loss:.3f} avg={avg[0] / avg[1]:.3f} {seconds:.3f}s/step{val_note}",
                    refresh=False)
                bar.update(1)
                improved = val_loss is not None and (self.best is None or val_loss < self.best["val_loss"])
                if improved or (args.save_every > 0 and step % args.save_every == 0 and step != end):
                    self.save(step, best_val_loss=val_loss if improved else None)
                    last_saved = step
                if args.sample_every > 0 and step % args.sample_every == 0:
                    self.write_samples(step)
                if val_loss is not None and args.early_stop and self.evaluations_since_best() >= args.early_stop:
                    tqdm.write(f"Early stop at step {step}: validation loss has not improved on "
                               f"{self.best['val_loss']:.3f} (step {self.best['step']}) in "
                               f"{args.early_stop} evaluations (--early-stop {args.early_stop})", file=sys.stderr)
                    break
            if step > self.start and last_saved != step:
                self.save(step)
                last_saved = step
        finally:
            bar.close()
            for s, handler in previous.items():
                signal.signal(s, handler)
            self.sess.close()
        if self.stop_signal:
            raise Interrupted(self.stop_signal, saved=last_saved is not None and self.dir == self.run_dir)
        if self.rows:
            _, loss, avg_loss, seconds, _ = self.rows[-1]
            print(f"Saved model-{step} in {self.run_dir} (loss {loss:.3f}, avg {avg_loss:.3f}, "
                  f"{seconds:.3f} s/step)")
        line = validation.verdict(self.rows)
        if line:
            print(line[0].upper() + line[1:])
        return self.run_dir

    def validate(self):
        """The mean loss over the fixed held-out windows, and the seconds it took."""
        started = time.time()
        size = self.args.batch_size
        losses = []
        for i in range(0, len(self.val_windows), size):
            batch = self.val_windows[i:i + size]
            n = len(batch)
            if n < size:  # the placeholder's batch size is fixed: pad with copies, drop their losses
                batch = np.concatenate([batch, np.repeat(batch[:1], size - n, axis=0)])
            losses.extend(self.sess.run(self.window_loss, feed_dict={self.context: batch})[:n])
        return float(np.mean(losses)), time.time() - started

    def evaluations_since_best(self):
        return sum(1 for r in self.rows if r[4] is not None and r[0] > self.best["step"])

    def request_stop(self, signum, frame):
        if self.stop_signal:  # a second Ctrl-C: stop now, the last good checkpoint stays
            raise KeyboardInterrupt
        self.stop_signal = signum
        tqdm.write(f"{signal.Signals(signum).name}: saving a checkpoint after this step "
                   "(again to stop without saving)", file=sys.stderr)

    def estimate(self, seconds_per_step, steps_left):
        if steps_left is None:
            tqdm.write(f"{seconds_per_step:.3g} s/step on {self.device}: 1,000 steps take about "
                       f"{duration(1000 * seconds_per_step)}", file=sys.stderr)
            return
        left = steps_left * seconds_per_step
        tqdm.write(f"About {duration(left)} left: {steps_left} more steps at {seconds_per_step:.3g} s/step "
                   f"on {self.device}", file=sys.stderr)
        hint = faster_options(self.device, self.n_params, left, self.args, self.window)
        if hint:
            tqdm.write(hint, file=sys.stderr)

    def train_step(self, step):
        """One optimizer step; its loss. A step that cannot be done raises TrainingFailed."""
        try:
            loss = self.run_step()
            for _ in range(FP16_RETRIES if self.loss_scale else 0):
                if not self.sess.run(self.loss_scale.skipped):
                    break
                tqdm.write(f"step {step}: float16 gradients overflowed, update skipped; loss scale now "
                           f"{self.sess.run(self.loss_scale.scale):g}", file=sys.stderr)
                if math.isfinite(loss):
                    break
                loss = self.run_step()  # a float16 loss that overflowed: the step again, on new windows
        except (MemoryError, tf.errors.ResourceExhaustedError):
            raise TrainingFailed(
                f"out of memory at step {step} with --batch-size {self.args.batch_size} and "
                f"{self.window}-token windows: use a smaller --batch-size or --window"
                f"{'' if self.args.recompute else ', or add --recompute'}; {self.kept()}") from None
        if not math.isfinite(loss):
            raise TrainingFailed(
                f"the loss became {loss} at step {step}: training diverged (try a lower --learning-rate "
                f"than {self.args.learning_rate:g}); stopped without saving, {self.kept()}") from None
        return loss

    def run_step(self):
        batch_size = self.args.batch_size

        def batch():
            return [self.sampler.sample(self.window) for _ in range(batch_size)]

        if self.args.accumulate_gradients > 1:
            self.sess.run(self.opt_reset)
            for _ in range(self.args.accumulate_gradients):
                self.sess.run(self.opt_compute, feed_dict={self.context: batch()})
            return float(self.sess.run(self.opt_apply))
        _, loss = self.sess.run((self.opt_apply, self.loss), feed_dict={self.context: batch()})
        return float(loss)

    def kept(self):
        latest = checkpoints.own(self.run_dir)[0] if self.dir == self.run_dir else None
        return f"{os.path.basename(latest)} in {self.run_dir} is untouched" if latest else "nothing was saved"

    # -- outputs -------------------------------------------------------------------------------
    def save(self, step, best_val_loss=None):
        """Write checkpoint model-<step>, counter and loss files as one unit: Ctrl-C/SIGTERM wait
        until it is done. The `checkpoint` file is the commit point (a resume reads the step from
        the name it holds), so a kill in between leaves the previous checkpoint in charge.
        best_val_loss: this step has the lowest validation loss so far; best.json names it."""
        if not self.sess.run(self.all_finite):
            raise TrainingFailed(f"the weights hold NaN or infinity after step {step}: training diverged "
                                 f"(try a lower --learning-rate than {self.args.learning_rate:g}); "
                                 f"stopped without saving, {self.kept()}")
        signals = {signal.SIGINT, signal.SIGTERM}
        signal.pthread_sigmask(signal.SIG_BLOCK, signals)
        try:
            try:
                if self.best:  # out of the Saver's list: --max-checkpoints never deletes the best
                    self.saver.recover_last_checkpoints([p for p in self.saver.last_checkpoints
                                                         if os.path.basename(p) != self.best["checkpoint"]])
                self.saver.save(self.sess, os.path.join(self.dir, "model"), global_step=step)
            except (tf.errors.OpError, ValueError) as e:
                raise TrainingFailed(f"cannot save model-{step} in {self.dir}: {os_reason(e)}; "
                                     f"{self.kept()}") from None
            atomic_write_text(os.path.join(self.dir, "counter"), f"{step}\n")
            loss_log.write(self.dir, self.rows, run_name=os.path.basename(self.run_dir))
            if best_val_loss is not None:
                self.keep_best(step, best_val_loss)
            if self.dir != self.run_dir:
                # First complete checkpoint: the work folder becomes the run folder.
                replace_dir(self.dir, self.run_dir)
                self.saver.recover_last_checkpoints(
                    [p.replace(self.dir, self.run_dir, 1) for p in self.saver.last_checkpoints])
                self.dir = self.run_dir
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, signals)
        if self.after_save:
            self.after_save(self.run_dir)

    def keep_best(self, step, val_loss):
        """Name model-<step> in best.json, then delete the previous best unless the Saver keeps it."""
        old = self.best
        self.best = {"checkpoint": f"model-{step}", "step": step, "val_loss": val_loss}
        atomic_write_text(os.path.join(self.dir, checkpoints.BEST_FILE), json.dumps(self.best) + "\n")
        kept = {os.path.basename(p) for p in self.saver.last_checkpoints}
        if old and old["checkpoint"] not in kept | {self.best["checkpoint"]}:
            checkpoints.delete(self.dir, old["checkpoint"])

    def write_samples(self, step):
        """Samples as gpt-2-simple writes them (samples-N), but inside the run folder."""
        args = self.args
        texts = []
        while len(texts) < args.sample_num:
            context_tokens = self.sampler.sample(1)
            out = self.sess.run(self.tf_sample, feed_dict={self.context: args.batch_size * [context_tokens]})
            for row in out[:args.sample_num - len(texts)]:
                texts.append(f"======== SAMPLE {len(texts) + 1} ========\n{self.enc.decode(row)}\n")
        folder = os.path.join(self.dir, "samples")
        os.makedirs(folder, exist_ok=True)
        atomic_write_text(os.path.join(folder, f"samples-{step}"), "\n".join(texts))
        tqdm.write(texts[0][:500])


def is_npz(path):
    return path.endswith(".npz") or os.path.isdir(path) and any(
        f.endswith(".npz") for _, _, files in os.walk(path) for f in files)


def check_token_ids(chunks, n_vocab, path):
    """A .npz holds token ids from whatever encoder made it; ids outside this model's vocabulary
    would stop TensorFlow with a traceback at the first step."""
    for chunk in chunks:
        if chunk.ndim != 1 or not np.issubdtype(chunk.dtype, np.integer) or (
                chunk.size and not 0 <= chunk.min() <= chunk.max() < n_vocab):
            raise UsageError(f"dataset {path} does not hold token ids of this model's vocabulary "
                             f"(0 to {n_vocab - 1}): encode it with this run's encoder.json")


def os_reason(error):
    """The operating system's reason inside a TensorFlow error ("No space left on device"), which
    TensorFlow buries under "Graph execution error:" and a node trace."""
    text = getattr(error, "message", None) or str(error)
    match = re.search(r"No space left on device|Disk quota exceeded|Permission denied|Read-only file system|"
                      r"File too large", text)
    return match.group(0) if match else first_line(error)


def first_line(error):
    text = getattr(error, "message", None) or str(error)
    return text.strip().splitlines()[0] if text.strip() else type(error).__name__
