"""Benchmark (not a test): one full-model forward at long context on this machine; prints time and peak RSS.

    python tools/bench_long_forward.py --config configs/small-8l.json --seq-len 65536 [--impl xla]

Random (official-style) init weights, batch 1, float32, ``jax.jit``; the first call (compile + run) and a second
call are timed separately. Peak host memory is this process's ``ru_maxrss``.
"""

from __future__ import annotations

import argparse
import resource
import time

import jax
import jax.numpy as jnp
import numpy as np

from spb2_jax.config import SpB2Config
from spb2_jax.model import SpB2ForCausalLM, init_params
from spb2_jax.options import resolve_options


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="config.json path")
    parser.add_argument("--seq-len", type=int, default=65536)
    parser.add_argument("--impl", default="xla", choices=["xla", "reference"])
    parser.add_argument("--repeats", type=int, default=1, help="timed calls after the first (compiling) one")
    args = parser.parse_args(argv)

    config = SpB2Config.from_json_file(args.config)
    params = init_params(config, jax.random.key(0))
    n_params = sum(x.size for x in jax.tree_util.tree_leaves(params))
    ids = jax.random.randint(jax.random.key(1), (1, args.seq_len), 0, config.vocab_size)
    model = SpB2ForCausalLM(config, resolve_options(config, impl=args.impl))
    forward = jax.jit(lambda p, x: model.apply({"params": p}, x).logits[:, -1])
    t0 = time.perf_counter()
    last = forward(params, ids).block_until_ready()
    first = time.perf_counter() - t0
    runs = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        forward(params, ids).block_until_ready()
        runs.append(time.perf_counter() - t0)
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30
    print(f"config={args.config} layers={','.join(config.layer_kinds)} params={n_params:,}")
    print(f"T={args.seq_len} impl={args.impl} backend={jax.default_backend()} devices={jax.device_count()}")
    print(f"first call (compile + run): {first:.1f} s; runs: {', '.join(f'{r:.1f} s' for r in runs)}")
    print(f"peak RSS: {peak_gib:.2f} GiB; last-token logits finite: {bool(np.isfinite(np.asarray(last)).all())}")


if __name__ == "__main__":
    main()
