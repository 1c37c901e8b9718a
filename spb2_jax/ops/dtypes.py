"""Accumulation dtype policy: statistics, norms, recurrent states and losses in at least float32."""

from __future__ import annotations

import jax.numpy as jnp


def acc_dtype(*arrays) -> jnp.dtype:
    """float32, or float64 when any input is float64 (``jax_enable_x64`` tests); never lower than float32."""
    return jnp.result_type(jnp.float32, *(a.dtype for a in arrays))


def round_bf16(x):
    """``x`` rounded to bfloat16 (round to nearest even) and back to its dtype."""
    return x.astype(jnp.bfloat16).astype(x.dtype)
