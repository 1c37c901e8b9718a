"""Normalisations, computed in float32 and cast back to the input dtype."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from spb2_jax.ops.dtypes import acc_dtype


def rms_norm(x: jax.Array, weight: jax.Array | None, eps: float) -> jax.Array:
    """``x / sqrt(mean(x^2, -1) + eps) * weight`` over the last axis, accumulated in float32."""
    x32 = x.astype(acc_dtype(x))
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
    if weight is not None:
        y = y * weight.astype(x32.dtype)
    return y.astype(x.dtype)


def gated_rms_norm(x: jax.Array, gate: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """``rms_norm(x) * weight * silu(gate)`` (fla ``FusedRMSNormGated`` with swish activation)."""
    acc = acc_dtype(x, gate)
    y = rms_norm(x.astype(acc), weight, eps)
    return (y * jax.nn.silu(gate.astype(acc))).astype(x.dtype)


def l2_norm(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    """``x / sqrt(sum(x^2, -1) + eps)`` over the last axis (fla ``l2norm``: eps inside the sqrt)."""
    x32 = x.astype(acc_dtype(x))
    return (x32 * jax.lax.rsqrt(jnp.sum(jnp.square(x32), axis=-1, keepdims=True) + eps)).astype(x.dtype)
