"""Compiled memory of one training step (loss + gradients) for each remat policy of ``ModelOptions.remat``.

    python tools/remat_memory.py --config configs/small-8l.json --seq-len 4096 --batch 1

Prints, per policy, XLA's ``memory_analysis()`` of ``jax.jit(jax.value_and_grad(loss_fn))`` compiled for abstract
inputs (nothing is run): temporaries, arguments, outputs. The numbers go to BENCHMARKS.md ("Remat policies").
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp

from spb2_jax.config import SpB2Config
from spb2_jax.model import abstract_params, loss_fn
from spb2_jax.options import REMAT_POLICIES, resolve_options


def step_memory(config: SpB2Config, policy: str, batch: int, seq_len: int, impl: str = "xla") -> dict[str, float]:
    """``{"temp", "argument", "output"}`` bytes and the compile seconds of one loss + grad step."""
    options = resolve_options(config, impl=impl, remat=policy)
    params = abstract_params(config)
    ids = jax.ShapeDtypeStruct((batch, seq_len), jnp.int32)

    def step(p, x):
        return jax.value_and_grad(lambda q: loss_fn(q, config, x, x, options=options)[0])(p)

    t0 = time.perf_counter()
    mem = jax.jit(step).lower(params, ids).compile().memory_analysis()
    return {"temp": mem.temp_size_in_bytes, "argument": mem.argument_size_in_bytes,
            "output": mem.output_size_in_bytes, "compile_s": time.perf_counter() - t0}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/small-8l.json")
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--impl", default="xla")
    parser.add_argument("--policies", nargs="*", default=list(REMAT_POLICIES))
    args = parser.parse_args(argv)
    config = SpB2Config.from_json_file(args.config)
    print(f"{args.config}: B={args.batch} T={args.seq_len} impl={args.impl} backend={jax.default_backend()}")
    print(f"{'policy':>20} {'temp MiB':>10} {'args MiB':>10} {'out MiB':>10} {'compile s':>10}")
    for policy in args.policies:
        m = step_memory(config, policy, args.batch, args.seq_len, args.impl)
        print(f"{policy:>20} {m['temp'] / 2**20:10.1f} {m['argument'] / 2**20:10.1f} {m['output'] / 2**20:10.1f} "
              f"{m['compile_s']:10.1f}", flush=True)


if __name__ == "__main__":
    main()
