"""The T2H pipeline end to end on CPU: teacher -> Qwen3 checkpoint -> hybrid -> distillation, with its numbers.

    python tools/t2h_demo.py [--out runs/t2h-demo] [--teacher-steps 300] [--kd-steps 300]

1. A tiny Qwen3-shaped teacher (``configs/train/t2h-demo-teacher.yaml``) learns Python source for a few hundred
   steps, so it is not random; it is saved as a Qwen3 HF checkpoint (``OUT/teacher-qwen3``, ``save_qwen3``).
2. ``python -m spb2_jax.t2h`` converts it into the tiny hybrid ``configs/tiny.json`` (``OUT/converted``).
3. The hybrid is distilled from the teacher (``configs/train/t2h-demo-kd.yaml``: KL only), its held-out KL to the
   teacher measured right after conversion (step 0) and every 50 steps.

Writes ``OUT/results.json`` (KL after conversion and at the end, their ratio, the time of each stage) and
``OUT/t2h-demo.png`` (teacher loss; the student's train and held-out KL). Refuses an ``OUT`` that exists.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

import jax

from spb2_jax.checkpoint.qwen3 import save_qwen3
from spb2_jax.t2h.__main__ import run as convert
from spb2_jax.train import load_config, train
from spb2_jax.train.metrics import read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER = os.path.join(REPO, "spb2_jax", "assets", "tiny", "tokenizer.json")


def plot(out: str, teacher_run: str, kd_run: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    t = read_metrics(teacher_run)
    a.plot([r["step"] for r in t if "loss" in r], [r["loss"] for r in t if "loss" in r], label="train loss")
    a.plot([r["step"] for r in t if "eval_loss" in r], [r["eval_loss"] for r in t if "eval_loss" in r], "o-",
           label="eval loss")
    a.set_title("1. tiny Qwen3 teacher on Python source")
    k = read_metrics(kd_run)
    b.plot([r["step"] for r in k if "kl_loss" in r], [r["kl_loss"] for r in k if "kl_loss" in r],
           label="train KL(teacher || student)")
    b.plot([r["step"] for r in k if "eval_kl" in r], [r["eval_kl"] for r in k if "eval_kl" in r], "s-",
           label="held-out KL (step 0: right after conversion)")
    b.set_title("3. converted hybrid distilled from the teacher")
    b.set_yscale("log")
    for ax in (a, b):
        ax.set_xlabel("step")
        ax.set_ylabel("nats / token")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path = os.path.join(out, "t2h-demo.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/t2h-demo")
    p.add_argument("--teacher-steps", type=int, default=300)
    p.add_argument("--kd-steps", type=int, default=300)
    args = p.parse_args(argv)
    if os.path.exists(args.out):
        print(f"error: --out {args.out} exists; choose a new directory or remove it", file=sys.stderr)
        return 2
    configs = os.path.join(REPO, "configs", "train")
    times = {}

    t0 = time.perf_counter()
    teacher_cfg = load_config(os.path.join(configs, "t2h-demo-teacher.yaml"),
                              [f"run_dir={args.out}/teacher", f"steps={args.teacher_steps}",
                               f"model.preset={os.path.join(REPO, 'configs', 'tiny-qwen3.json')}"])
    teacher = train(teacher_cfg)
    from spb2_jax.config import SpB2Config

    teacher_dir = os.path.join(args.out, "teacher-qwen3")
    save_qwen3(SpB2Config.from_json_file(teacher_cfg.model.preset), jax.device_get(teacher.state.params),
               teacher_dir, progress=False)
    shutil.copyfile(TOKENIZER, os.path.join(teacher_dir, "tokenizer.json"))
    times["teacher_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    converted = os.path.join(args.out, "converted")
    table = convert(teacher_dir, os.path.join(REPO, "configs", "tiny.json"), converted, progress=False)
    times["convert_s"] = time.perf_counter() - t0
    print(table)

    t0 = time.perf_counter()
    kd_cfg = load_config(os.path.join(configs, "t2h-demo-kd.yaml"),
                         [f"run_dir={args.out}/kd", f"steps={args.kd_steps}", f"model.checkpoint={converted}",
                          f"distill.teacher={teacher_dir}"])
    train(kd_cfg)
    times["distill_s"] = time.perf_counter() - t0

    kd = [r for r in read_metrics(kd_cfg.run_dir) if "eval_kl" in r]
    teacher_records = [r for r in read_metrics(teacher_cfg.run_dir) if "loss" in r]
    results = {
        "teacher_loss_first": teacher_records[0]["loss"], "teacher_loss_last": teacher_records[-1]["loss"],
        "kl_after_conversion": kd[0]["eval_kl"], "kl_after_distillation": kd[-1]["eval_kl"],
        "kl_ratio": kd[-1]["eval_kl"] / kd[0]["eval_kl"], "eval_kl": [(r["step"], r["eval_kl"]) for r in kd],
        "times_s": times, "device": str(jax.devices()[0]), "cpu_count": os.cpu_count(),
    }
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    png = plot(args.out, teacher_cfg.run_dir, kd_cfg.run_dir)
    print(f"held-out KL(teacher || student): {results['kl_after_conversion']:.4f} after conversion -> "
          f"{results['kl_after_distillation']:.4f} after {args.kd_steps} steps (ratio {results['kl_ratio']:.3f}); "
          f"times {', '.join(f'{k} {v:.0f}' for k, v in times.items())}; {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
