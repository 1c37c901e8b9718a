"""Benchmark (not a test): training-step cost of each layer kind of a config.

    python tools/bench_layer_kinds.py --config configs/tiny.json --batch 16 --seq-len 258

Times the jitted ``value_and_grad`` of the summed CE (``spb2_jax.train.step.loss_parts``) of the config as given
and of three variants with every layer of one kind (all MoBA, all full attention, all SSE), same width and depth,
on random tokens: min of 3 runs after one compile-and-run.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from spb2_jax.config import SpB2Config
from spb2_jax.model import SpB2ForCausalLM, init_params
from spb2_jax.options import resolve_options
from spb2_jax.train.step import loss_parts


def variants(config: SpB2Config) -> dict[str, SpB2Config]:
    every = tuple(range(config.num_hidden_layers))
    return {"as given": config,
            "all MoBA": config.replace(attn={"layers": every, "full_layers": ()}),
            "all full": config.replace(attn={"layers": every, "full_layers": every}),
            "all SSE": config.replace(attn={"layers": (), "full_layers": ()})}


def step_seconds(config: SpB2Config, batch: int, seq_len: int, chunk_size: int) -> tuple[float, float]:
    model = SpB2ForCausalLM(config, resolve_options(config, chunk_size=chunk_size))
    params = init_params(config, jax.random.key(0))
    ids = jnp.asarray(np.random.default_rng(0).integers(3, config.vocab_size, (batch, seq_len)), jnp.int32)
    data = {"input_ids": ids, "segment_ids": jnp.ones_like(ids)}
    f = jax.jit(jax.value_and_grad(lambda p: loss_parts(model, p, data, None, 512)[0]))
    t0 = time.perf_counter()
    jax.block_until_ready(f(params))
    compile_s = time.perf_counter() - t0
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        jax.block_until_ready(f(params))
        best = min(best, time.perf_counter() - t0)
    return compile_s, best


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/tiny.json")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=258)
    p.add_argument("--chunk-size", type=int, default=64)
    args = p.parse_args(argv)
    config = SpB2Config.from_json_file(args.config)
    print(f"config={args.config} batch={args.batch} T={args.seq_len} backend={jax.default_backend()}")
    print("| layers | compile s | step s |\n|---|---:|---:|")
    for name, c in variants(config).items():
        compile_s, step = step_seconds(c, args.batch, args.seq_len, args.chunk_size)
        print(f"| {name} | {compile_s:.1f} | {step:.3f} |", flush=True)


if __name__ == "__main__":
    main()
