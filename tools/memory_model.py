"""Predicted per-device memory of a prefill (``spb2_jax.eval.memory``), and its check against measured peaks.

    python tools/memory_model.py --config configs/small-8l.json --context 65536 [--mesh sequence=8] [--dtype bfloat16]
    python tools/memory_model.py --check eval_speed/results.json     # every point of a `speed` run

The prediction is params + caches + logits + activations (the largest layer's working set plus what every other
layer keeps), from shapes; see ``spb2_jax/eval/memory.py``. ``--check`` prints predicted vs measured per point and
exits 1 when one is off by more than ``--tolerance`` (default 15 %).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

MiB = 2 ** 20


def _check(path: str, tolerance: float) -> int:
    from spb2_jax.config import SpB2Config
    from spb2_jax.eval.memory import predict_memory
    from spb2_jax.eval.speed import variant_config
    from spb2_jax.options import resolve_options

    with open(path) as f:
        res = json.load(f)
    if res.get("command") != "speed":
        print(f"error: {path} is not the results.json of a speed run", file=sys.stderr)
        return 2
    a = res["args"]
    if a.get("config"):
        base = SpB2Config.from_json_file(a["config"])
    else:
        from spb2_jax.checkpoint.auto import config_of
        base = config_of(a.get("checkpoint"))
    lengths = sorted(a["lengths"])
    calibration = {"calibration": tuple(lengths[:2])} if len(lengths) >= 2 else {}
    worst = 0.0
    print(f"{'variant':>8} {'T':>7} {'measured MiB':>12} {'predicted MiB':>13} {'error':>7}   parts (MiB)")
    for v, c in res["curves"].items():
        cfg = variant_config(base, v)
        dtype = resolve_options(cfg, dtype=a.get("dtype")).dtype
        for p in c["points"]:
            pred = predict_memory(cfg, p["T"], dtype=dtype, extra_slots=a.get("decode_steps", 0), **calibration)
            err = pred["total"] / p["peak_bytes"] - 1
            worst = max(worst, abs(err))
            parts = " ".join(f"{k} {x / MiB:.1f}" for k, x in pred.items() if k != "total")
            print(f"{v:>8} {p['T']:>7} {p['peak_bytes'] / MiB:>12.1f} {pred['total'] / MiB:>13.1f} "
                  f"{100 * err:>+6.1f}%   {parts}")
    print(f"largest error {100 * worst:.1f}% (tolerance {100 * tolerance:.0f}%)")
    return 0 if worst <= tolerance else 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="model config JSON")
    p.add_argument("--context", type=int, help="context length in tokens")
    p.add_argument("--mesh", default=None, help="e.g. sequence=8 or fsdp=2,sequence=4")
    p.add_argument("--dtype", default=None, help="compute dtype (default: the config's)")
    p.add_argument("--check", metavar="RESULTS_JSON", help="compare with the measured peaks of a speed run")
    p.add_argument("--tolerance", type=float, default=0.15)
    args = p.parse_args(argv)
    if args.check:
        if not os.path.isfile(args.check):
            print(f"error: --check {args.check!r}: no such file", file=sys.stderr)
            return 2
        return _check(args.check, args.tolerance)
    if not args.config or not args.context or not os.path.isfile(args.config):
        print("error: give --config FILE (an existing config JSON) and --context N, or --check RESULTS_JSON",
              file=sys.stderr)
        return 2
    from spb2_jax.config import SpB2Config
    from spb2_jax.eval.common import EvalError, mesh_sizes
    from spb2_jax.eval.memory import predict_memory

    try:
        sizes = mesh_sizes(args.mesh)
    except EvalError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    pred = predict_memory(SpB2Config.from_json_file(args.config), args.context, mesh=sizes or None, dtype=args.dtype)
    for k, x in pred.items():
        print(f"{k:>12} {x / MiB:>10.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
