"""The INT8-Spiking report: ``python -m spb2_jax.spiking_report --checkpoint DIR --text FILE [--k 3] [--out DIR]``.

Runs the checkpoint (SpB2 or Qwen3; default: the embedded tiny model) in float32 and with INT8-Spiking coding on
the first ``--max-tokens`` tokens of ``--text`` and writes, to ``--out`` (default ``spiking_report/``): the per-layer
and overall table (``report.txt``, also printed), ``report.json``, ``sparsity_per_layer.png`` and ``k_sweep.png``
(sparsity vs perplexity for k = 2 ... 4, the shape of SpikingBrain 1.0's Table 11). See
``spb2_jax.quant.report`` for the definitions and the energy constants. A user mistake prints one ``error:`` line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

from spb2_jax.api import EMBEDDED_TINY, load_pretrained
from spb2_jax.checkpoint.auto import config_of
from spb2_jax.model import abstract_params
from spb2_jax.quant.report import K_SWEEP, format_report, plot_report, select_layers, spiking_report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m spb2_jax.spiking_report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=None, help="HF checkpoint directory (default: the embedded tiny model)")
    p.add_argument("--text", required=True, help="a text file (held-out text)")
    p.add_argument("--k", type=float, default=3.0, help="threshold divisor: V_th = mean|x| / k (default 3)")
    p.add_argument("--max-tokens", type=int, default=512)
    p.add_argument("--layers", default=None, help="regex of the layer paths to report (default: every coded layer)")
    p.add_argument("--sweep", default=",".join(str(k) for k in K_SWEEP),
                   help="the k values of the sparsity / perplexity sweep (default 2,2.5,3,3.5,4)")
    p.add_argument("--out", default="spiking_report")
    args = p.parse_args(argv)
    try:
        if args.k <= 0:
            raise ValueError(f"--k {args.k} must be > 0 (the spiking threshold is mean|x| / k)")
        try:
            sweep = tuple(float(x) for x in args.sweep.split(",") if x.strip())
        except ValueError:
            raise ValueError(f"--sweep {args.sweep!r} must be comma-separated numbers, e.g. 2,3,4") from None
        if not sweep or min(sweep) <= 0:
            raise ValueError(f"--sweep {args.sweep!r} must be positive k values")
        if not os.path.isfile(args.text):
            raise FileNotFoundError(f"--text {args.text!r}: no such file")
        config = config_of(args.checkpoint or EMBEDDED_TINY)
        select_layers(abstract_params(config), args.layers)  # before any weight is read
        model = load_pretrained(args.checkpoint)
        if model.tokenizer is None:
            raise ValueError(f"--checkpoint {args.checkpoint!r} has no tokenizer.json")
        with open(args.text, encoding="utf-8", errors="replace") as f:
            ids = model.encode(f.read())[:args.max_tokens]
        if len(ids) < 2:
            raise ValueError(f"--text {args.text!r} gives {len(ids)} tokens; at least 2 are needed")
        report = spiking_report(model.config, model.params, np.asarray([ids]), k=args.k, layers=args.layers,
                                sweep=sweep)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    text = format_report(report)
    with open(os.path.join(args.out, "report.txt"), "w") as f:
        f.write(text)
    with open(os.path.join(args.out, "report.json"), "w") as f:
        json.dump(report, f, indent=1)
    pngs = plot_report(report, args.out)
    sys.stdout.write(text)
    print(f"wrote {args.out}/report.txt, report.json, {', '.join(os.path.basename(p) for p in pngs)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
