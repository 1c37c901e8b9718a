"""What a run reports: ``RUN_DIR/metrics.jsonl`` (one JSON object per logged step, appended), TensorBoard event
files (tensorboardX, ``RUN_DIR/tensorboard``), a progress bar on a terminal (plain lines otherwise), and a loss
curve PNG (matplotlib) at the end."""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from tqdm import tqdm


class RunLog:
    """Append-only metrics of one run directory (JSONL + TensorBoard) and the progress display.

    On resume the JSONL keeps the lines of steps before the restored step and drops later ones (the steps being
    re-run), so the file always describes one consistent run."""

    def __init__(self, run_dir: str, *, total_steps: int, start_step: int, is_primary: bool = True,
                 tensorboard: bool = True):
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.primary = is_primary
        self.writer = None
        if is_primary:
            _truncate_after(self.path, start_step)
            if tensorboard:
                from tensorboardX import SummaryWriter  # heavy import, only on the primary host

                self.writer = SummaryWriter(os.path.join(run_dir, "tensorboard"), purge_step=start_step + 1)
        self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True,
                        disable=not (is_primary and sys.stderr.isatty()))
        self.plain = is_primary and not sys.stderr.isatty()

    def log(self, record: dict[str, Any]) -> None:
        """Write one step's record (``{"step": int, "loss": float, ...}``) everywhere."""
        if not self.primary:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        step = record["step"]
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.writer.add_scalar(f"train/{key}" if not key.startswith("eval") else key, value, step)
        shown = {k: record[k] for k in ("loss", "kl_loss", "lr", "grad_norm", "tokens_per_s", "mfu", "eval_loss",
                                        "eval_accuracy", "eval_kl") if k in record}
        text = " ".join(f"{k}={_fmt(v)}" for k, v in shown.items())
        if self.plain:
            print(f"step {step} {text}", flush=True)
        else:
            self.bar.set_postfix_str(text, refresh=False)

    def advance(self, n: int = 1) -> None:
        self.bar.update(n)

    def message(self, text: str) -> None:
        """A line that does not break the progress bar."""
        if self.primary:
            tqdm.write(text, file=sys.stderr if not self.plain else sys.stdout)

    def close(self) -> None:
        self.bar.close()
        if self.writer is not None:
            self.writer.close()


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _truncate_after(path: str, step: int) -> None:
    """Keep only the records of steps <= ``step`` (a resumed run re-runs the later ones)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    kept = [line for line in lines if json.loads(line).get("step", 0) <= step]
    if len(kept) != len(lines):
        with open(path, "w") as f:
            f.writelines(kept)


def read_metrics(run_dir: str) -> list[dict[str, Any]]:
    """The records of ``RUN_DIR/metrics.jsonl``."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_loss(run_dir: str, out: str | None = None) -> str:
    """``RUN_DIR/loss.png``: training loss (and eval loss, KL to a distillation teacher, when logged) against the
    step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    out = out or os.path.join(run_dir, "loss.png")
    fig, ax = plt.subplots(figsize=(6, 4))
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    if train:
        ax.plot(*zip(*train), label="train loss")
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    for key, style, label in (("kl_loss", "-", "train KL to the teacher"), ("eval_kl", "s-", "eval KL to the teacher")):
        points = [(r["step"], r[key]) for r in records if key in r]
        if points:
            ax.plot(*zip(*points), style, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / token)")
    ax.set_title(os.path.basename(os.path.abspath(run_dir)))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
