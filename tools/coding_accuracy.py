"""FP8 and INT8-Spiking accuracy vs float32: perplexity change, next-token KL and top-1 agreement.

    python tools/coding_accuracy.py --checkpoint runs/tiny-text/hf --text FILE [--max-tokens 1024] \\
        [--fixtures ../shared/fixtures/official/tiny ...] [--k 3] [--out results.json]

``--checkpoint`` / ``--text``: a trained model on held-out text (rows of ``--seq-len`` tokens); ``--fixtures``: the
official golden fixtures' models on their own ``inputs.npz`` (random O(1) weights, random tokens: the worst case for
a coding, not a language-modelling measurement). Definitions in ``spb2_jax.quant.accuracy``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from spb2_jax.api import load_pretrained  # noqa: E402
from spb2_jax.quant.accuracy import coding_accuracy  # noqa: E402


def _row(name: str, r: dict) -> str:
    cells = [f"{name:<34} {r['tokens']:>6} {r['ppl_float32']:>10.4f}"]
    for c in ("fp8", "int8_spiking"):
        x = r[c]
        cells.append(f"{x['ppl']:>10.4f} {100 * x['ppl_change']:>+7.2f}% {100 * x['top1_agreement']:>6.2f}% "
                     f"{x['kl']:>9.2e}")
    return " | ".join(cells)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint")
    p.add_argument("--text")
    p.add_argument("--max-tokens", type=int, default=1024)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--fixtures", nargs="*", default=[])
    p.add_argument("--k", type=float, default=3.0)
    p.add_argument("--out")
    a = p.parse_args(argv)
    results = {}
    if a.checkpoint:
        model = load_pretrained(a.checkpoint)
        with open(a.text, encoding="utf-8", errors="replace") as f:
            ids = model.encode(f.read())[:a.max_tokens]
        rows = len(ids) // a.seq_len
        if rows == 0:
            print(f"error: --text gives {len(ids)} tokens, fewer than --seq-len {a.seq_len}", file=sys.stderr)
            return 2
        ids = np.asarray(ids[:rows * a.seq_len]).reshape(rows, a.seq_len)
        results[f"{a.checkpoint} on {os.path.basename(a.text)}"] = coding_accuracy(
            model.config, model.params, ids, spike_k=a.k)
    for d in a.fixtures:
        model = load_pretrained(d)
        inputs = np.load(os.path.join(d, "inputs.npz"))
        mask = inputs["attention_mask"] if "attention_mask" in inputs.files else None
        results[f"fixture {os.path.basename(d.rstrip('/'))}"] = coding_accuracy(
            model.config, model.params, inputs["input_ids"], mask, spike_k=a.k)
    print(f"{'model / input':<34} {'tokens':>6} {'ppl f32':>10} | {'FP8: ppl':>10} {'change':>8} {'top-1':>7} "
          f"{'KL':>9} | {'INT8-Spk: ppl':>10} {'change':>8} {'top-1':>7} {'KL':>9}")
    for name, r in results.items():
        print(_row(name, r))
    print("\nwhy top-1 flips: float32 top-1 - top-2 logit gap (median: all / flipped positions), share of positions "
          "whose gap is below the coded logit error rms")
    for name, r in results.items():
        for c in ("fp8", "int8_spiking"):
            x = r[c]
            print(f"{name:<34} {c:<13} gap {x['gap_median']:.3f} / {x['gap_median_flipped']:.3f}, error rms "
                  f"{x['logit_error_rms']:.4f}, gap < error rms: {100 * x['gap_below_error_share']:.2f}%")
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"k": a.k, "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
