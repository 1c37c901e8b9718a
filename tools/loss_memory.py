"""Compiled memory (not a test) of the causal-LM loss + gradients: plain ``[B, T, V]`` logits vs ``spb2_jax.loss``.

    python tools/loss_memory.py [--batch 1] [--seq-len 32768] [--vocab 151936] [--dim 2560] [--tile 512]
                                [--dtype float32|bfloat16] [--param-dtype float32|bfloat16] [--no-plain]

Compiles ``jax.jit(jax.value_and_grad(loss, argnums=(hidden, head_kernel)))`` on abstract inputs
(``jax.ShapeDtypeStruct``: nothing is allocated) for this machine's default backend and prints XLA's
``memory_analysis()``: temporaries, arguments and outputs, and the temporaries as a fraction of the float32
``[B, T, V]`` logits. The plain path is the model's head (``nn.Dense(dtype=dtype)``) then
``spb2_jax.model.causal_lm_loss``; the tiled one is ``spb2_jax.loss.causal_lm_loss_tiled``.
"""

from __future__ import annotations

import argparse
import time

import flax.linen as nn
import jax
import jax.numpy as jnp

from spb2_jax.loss import causal_lm_loss_tiled
from spb2_jax.model import causal_lm_loss

AUX_COEF = 0.01


def compiled_memory(loss_fn, B: int, T: int, V: int, D: int, dtype, param_dtype) -> dict[str, float]:
    """Sizes in bytes (and compile seconds) of jitted loss + grads w.r.t. hidden ``[B, T, D]`` and kernel ``[D, V]``."""
    args = (jax.ShapeDtypeStruct((B, T, D), dtype), jax.ShapeDtypeStruct((D, V), param_dtype),
            jax.ShapeDtypeStruct((B, T), jnp.int32), jax.ShapeDtypeStruct((4,), jnp.float32))
    grad = jax.value_and_grad(lambda h, k, labels, aux: loss_fn(h, k, labels, aux)["loss"], argnums=(0, 1))
    start = time.perf_counter()
    stats = jax.jit(grad).lower(*args).compile().memory_analysis()
    return {"temp": stats.temp_size_in_bytes, "argument": stats.argument_size_in_bytes,
            "output": stats.output_size_in_bytes, "compile_s": time.perf_counter() - start}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=32_768)
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--dim", type=int, default=2_560)
    parser.add_argument("--tile", type=int, default=512, help="tile_size of the tiled loss")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="compute dtype")
    parser.add_argument("--param-dtype", default="float32", choices=["float32", "bfloat16"], help="kernel dtype")
    parser.add_argument("--no-plain", action="store_true", help="skip the plain (untiled) loss")
    args = parser.parse_args(argv)
    B, T, V, D = args.batch, args.seq_len, args.vocab, args.dim
    dtype, param_dtype = jnp.dtype(args.dtype), jnp.dtype(args.param_dtype)

    def plain(hidden, kernel, labels, aux):
        logits = nn.Dense(V, use_bias=False, dtype=dtype).apply({"params": {"kernel": kernel}}, hidden)  # [B, T, V]
        return causal_lm_loss(logits, labels, aux, AUX_COEF)

    def tiled(hidden, kernel, labels, aux):
        return causal_lm_loss_tiled(hidden, kernel, labels, aux, AUX_COEF, tile_size=args.tile)

    logits_bytes = B * T * V * 4
    print(f"backend {jax.default_backend()}  B={B} T={T} V={V} D={D} tile={args.tile} dtype={args.dtype} "
          f"param_dtype={args.param_dtype}  [B, T, V] float32 logits: {logits_bytes / 1e9:.3f} GB")
    print(f"{'loss + grads':<14}{'temp GB':>10}{'temp/logits':>13}{'argument GB':>13}{'output GB':>11}"
          f"{'compile s':>11}")
    paths = [("tiled", tiled)] if args.no_plain else [("plain", plain), ("tiled", tiled)]
    for name, fn in paths:
        m = compiled_memory(fn, B, T, V, D, dtype, param_dtype)
        print(f"{name:<14}{m['temp'] / 1e9:>10.3f}{m['temp'] / logits_bytes:>13.2%}{m['argument'] / 1e9:>13.3f}"
              f"{m['output'] / 1e9:>11.3f}{m['compile_s']:>11.1f}")


if __name__ == "__main__":
    main()
