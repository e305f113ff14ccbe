"""The run folder's loss log: loss.csv (one row a step) and its plot, loss.png.

A row is (step, loss, avg_loss, seconds_per_step, val_loss or None)."""
import csv
import io
import os

from finetune.files import atomic_write_text


def read(folder):
    path = os.path.join(folder, "loss.csv")
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        return [(int(r["step"]), float(r["loss"]), float(r["avg_loss"]), float(r["seconds_per_step"]),
                 float(r["val_loss"]) if r.get("val_loss") else None)  # runs before validation have none
                for r in csv.DictReader(f)]


def write(folder, rows, run_name):
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["step", "loss", "avg_loss", "seconds_per_step", "val_loss"])
    writer.writerows((s, f"{loss:.6f}", f"{avg:.6f}", f"{sec:.4f}", "" if val is None else f"{val:.6f}")
                     for s, loss, avg, sec, val in rows)
    atomic_write_text(os.path.join(folder, "loss.csv"), out.getvalue())
    if rows:
        plot(folder, rows, run_name)


def plot(folder, rows, run_name):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r[0] for r in rows]
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    ax.plot(steps, [r[1] for r in rows], lw=0.8, alpha=0.4, label="loss")
    ax.plot(steps, [r[2] for r in rows], lw=1.8, label="average loss")
    evaluated = [r for r in rows if r[4] is not None]
    if evaluated:
        ax.plot([r[0] for r in evaluated], [r[4] for r in evaluated], "o-", lw=1.8, ms=3,
                label="validation loss (held-out text)")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(f"fine-tuning loss: {run_name}")  # folder may still be the hidden work folder
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = os.path.join(folder, ".loss.png.partial")
    fig.savefig(tmp, format="png")
    plt.close(fig)
    os.replace(tmp, os.path.join(folder, "loss.png"))
