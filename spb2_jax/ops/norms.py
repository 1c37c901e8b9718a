"""Normalisations, computed in float32 and cast back to the input dtype."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def rms_norm(x: jax.Array, weight: jax.Array | None, eps: float) -> jax.Array:
    """``x / sqrt(mean(x^2, -1) + eps) * weight`` over the last axis, accumulated in float32."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
    if weight is not None:
        y = y * weight.astype(jnp.float32)
    return y.astype(x.dtype)


def gated_rms_norm(x: jax.Array, gate: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """``rms_norm(x) * weight * silu(gate)`` (fla ``FusedRMSNormGated`` with swish activation)."""
    y = rms_norm(x.astype(jnp.float32), weight, eps)
    return (y * jax.nn.silu(gate.astype(jnp.float32))).astype(x.dtype)


def l2_norm(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    """``x / sqrt(sum(x^2, -1) + eps)`` over the last axis (fla ``l2norm``: eps inside the sqrt)."""
    x32 = x.astype(jnp.float32)
    return (x32 * jax.lax.rsqrt(jnp.sum(jnp.square(x32), axis=-1, keepdims=True) + eps)).astype(x.dtype)
