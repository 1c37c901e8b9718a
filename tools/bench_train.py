"""Benchmark (not a test): training throughput, MFU and memory of one model config per remat policy.

    python tools/bench_train.py --config configs/small-8l.json --seq-len 4096 --remat none,full,save_dots

For each remat policy: the jitted ``spb2_jax.train.step.make_train_step`` (AdamW, batch ``--batch`` rows of
``--seq-len`` tokens, float32 master params, ``--dtype`` compute) is compiled, run once, then timed over
``--steps`` steps (run one policy per process for a per-policy peak RSS). Reported: tokens/s, model FLOPs per
token (``spb2_jax.train.flops``), MFU (model FLOPs) and HFU (plus recomputation) against the device's peak — on
CPU there is no data-sheet peak, so the peak is measured: the best FLOP/s of a float32 2048^3 matmul on this
machine (``--peak-flops`` overrides) — the compiled program's temporary memory (XLA ``memory_analysis``) and
the process's peak RSS.
"""

from __future__ import annotations

import argparse
import resource
import time

import jax
import jax.numpy as jnp

from spb2_jax.config import SpB2Config
from spb2_jax.model import abstract_params, init_params
from spb2_jax.options import resolve_options
from spb2_jax.train.config import OptimizerSection
from spb2_jax.train.flops import peak_flops, train_flops_per_token
from spb2_jax.train.optim import learning_rate, make_optimizer
from spb2_jax.train.step import TrainState, make_train_step


def measured_matmul_peak(n: int = 2048, repeats: int = 5) -> float:
    """Best FLOP/s of an ``n^3`` float32 matmul on the default device."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--remat", default="none,full,save_dots")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--peak-flops", type=float, default=None)
    args = p.parse_args(argv)

    config = SpB2Config.from_json_file(args.config)
    peak = args.peak_flops or peak_flops(jax.devices()[0]) or measured_matmul_peak()
    opt = OptimizerSection(lr=1e-4, warmup_steps=0)
    optimizer = make_optimizer(opt, 100)
    params = jax.jit(lambda k: init_params(config, k))(jax.random.key(0))
    state = TrainState(jnp.zeros((), jnp.int32), params, jax.jit(optimizer.init)(params))
    ids = jax.random.randint(jax.random.key(1), (args.batch, args.seq_len), 3, config.vocab_size)
    batch = {"input_ids": ids, "segment_ids": jnp.ones_like(ids)}
    tokens = args.batch * args.seq_len
    print(f"config={args.config} T={args.seq_len} batch={args.batch} dtype={args.dtype} "
          f"backend={jax.default_backend()} peak={peak / 1e9:.1f} GFLOP/s "
          f"({'data sheet / given' if args.peak_flops or peak_flops(jax.devices()[0]) else 'measured matmul'})")
    print("| remat | tokens/s | step s | model GFLOP/token | MFU | HFU | compiled temp GiB | peak RSS GiB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for remat in args.remat.split(","):
        options = resolve_options(config, dtype=args.dtype, remat=remat)
        step = jax.jit(make_train_step(config, options, optimizer, learning_rate(opt, 100), loss_tile=512))
        compiled = step.lower(state, batch).compile()
        temp = compiled.memory_analysis().temp_size_in_bytes / 2 ** 30
        jax.block_until_ready(compiled(state, batch))
        t0 = time.perf_counter()
        for _ in range(args.steps):
            out = compiled(state, batch)
        jax.block_until_ready(out)
        dt = (time.perf_counter() - t0) / args.steps
        model_flops = train_flops_per_token(config, abstract_params(config), args.seq_len)
        hardware_flops = train_flops_per_token(config, abstract_params(config), args.seq_len, remat=remat)
        tps = tokens / dt
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
        print(f"| {remat} | {tps:,.0f} | {dt:.2f} | {model_flops / 1e9:.3f} | {100 * model_flops * tps / peak:.1f}% "
              f"| {100 * hardware_flops * tps / peak:.1f}% | {temp:.2f} | {rss:.2f} |", flush=True)


if __name__ == "__main__":
    main()
