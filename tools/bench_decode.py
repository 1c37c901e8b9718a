"""Benchmark (not a test): cached decode speed vs context length on this machine.

    python tools/bench_decode.py [--config configs/small-8l.json] [--contexts 1024 8192 32768] [--steps 32]

For each context length L the cache holds L tokens and one ``decode_step`` (batch 1) is timed over ``--steps``
consecutive steps after a warm-up step. Two models with the same shapes: the config as given (full + MoBA +
SSE/SWA layers) and its SSE/SWA-only variant (every layer an SSE + sliding-window layer), whose per-token cost
must not grow with the context.

The caches are filled synthetically (random keys/values, MoBA block sums consistent with the keys, random SSE
states, a full SWA ring ending at position L - 1) instead of by a prefill: decode cost depends on the shapes and
the context length, not on the values, and a 32k prefill per configuration would dominate the run on CPU.
Random (official-style) init weights, float32.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from spb2_jax.config import SpB2Config
from spb2_jax.generate import Cache, KVCache, SSECache, init_cache
from spb2_jax.generate import decode
from spb2_jax.model import init_params


def synthetic_cache(config: SpB2Config, context: int, max_len: int, seed: int = 0) -> Cache:
    """A batch-1 cache that has seen ``context`` tokens (values random, structure exact)."""
    cache = init_cache(config, 1, max_len)
    rng = np.random.default_rng(seed)
    seen = np.arange(max_len) < context
    layers = []
    for layer in cache.layers:
        if isinstance(layer, KVCache):
            axis = layer.k.shape.index(max_len)  # the slot axis ([1, K, S, H]; [1, S, K, H] before 2026-11-23)
            shape = [1] * layer.k.ndim
            shape[axis] = max_len
            k = rng.standard_normal(layer.k.shape, np.float32) * seen.reshape(shape)
            v = rng.standard_normal(layer.v.shape, np.float32) * seen.reshape(shape)
            sums = layer.block_sums  # [1, nblk, K, H]
            if sums is not None:
                nblk, C = sums.shape[1], config.attn.moba_chunk_size
                ks = np.moveaxis(k, axis, 1)  # [1, S, K, H]
                padded = np.zeros((1, nblk * C) + ks.shape[2:], np.float32)
                padded[:, :max_len] = ks
                sums = padded.reshape(1, nblk, C, *ks.shape[2:]).sum(2)
            layers.append(KVCache(k=jnp.asarray(k), v=jnp.asarray(v),
                                  block_sums=None if sums is None else jnp.asarray(sums)))
        else:
            W = layer.k.shape[1]
            pos = np.arange(context - W, context)  # the last W positions, slot = position % W
            ring = np.full((1, W), -1, np.int32)
            ring[0, pos[pos >= 0] % W] = pos[pos >= 0]
            layers.append(SSECache(state=jnp.asarray(rng.standard_normal(layer.state.shape, np.float32) * 0.1),
                                   k=jnp.asarray(rng.standard_normal(layer.k.shape, np.float32)),
                                   v=jnp.asarray(rng.standard_normal(layer.v.shape, np.float32)),
                                   pos=jnp.asarray(ring)))
    return Cache(layers=tuple(layers), length=jnp.full((1,), context, jnp.int32), max_len=max_len)


def time_decode(config: SpB2Config, params, context: int, steps: int, in_place: bool = True) -> tuple[float, float]:
    """(compile seconds, seconds per decode step) at ``context`` cached tokens."""
    cache = synthetic_cache(config, context, context + steps + 1)
    token = jnp.ones((1, 1), jnp.int32)
    valid = jnp.ones((1, 1), bool)
    t0 = time.perf_counter()
    fn = decode.extend_in_place if in_place else decode.extend
    step = fn.lower(params, token, valid, cache, config=config, fresh=False, all_logits=True).compile()
    compile_s = time.perf_counter() - t0
    logits, cache = step(params, token, valid, cache)  # warm-up
    logits.block_until_ready()
    t0 = time.perf_counter()
    for _ in range(steps):
        logits, cache = step(params, token, valid, cache)
        token = jnp.argmax(logits[:, -1:], axis=-1).astype(jnp.int32)  # feed back on device, no host sync
    token.block_until_ready()
    return compile_s, (time.perf_counter() - t0) / steps


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/small-8l.json", help="config.json path")
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 8192, 32768])
    parser.add_argument("--steps", type=int, default=32, help="timed decode steps per context")
    parser.add_argument("--copy-cache", action="store_true",
                        help="do not donate the cache (each step writes a new copy of it): the baseline")
    args = parser.parse_args(argv)
    in_place = not args.copy_cache and hasattr(decode, "extend_in_place")

    base = SpB2Config.from_json_file(args.config)
    linear_only = base.replace(attn={"layers": (), "full_layers": ()})
    print(f"backend={jax.default_backend()} devices={jax.device_count()} batch=1 float32 steps={args.steps} "
          f"cache {'donated (in place)' if in_place else 'copied each step'}")
    for name, config in (("as given", base), ("SSE/SWA only", linear_only)):
        params = init_params(config, jax.random.key(0))
        print(f"\n{args.config} ({name}): layers={','.join(config.layer_kinds)}")
        print(f"{'context':>8} {'ms/token':>9} {'tokens/s':>9} {'compile s':>9}")
        for L in args.contexts:
            compile_s, per_step = time_decode(config, params, L, args.steps, in_place)
            print(f"{L:>8} {per_step * 1e3:>9.2f} {1 / per_step:>9.1f} {compile_s:>9.1f}", flush=True)


if __name__ == "__main__":
    main()
