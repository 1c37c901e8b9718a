"""Rotary position embedding (NeoX "rotate half" layout over the whole head dim) from explicit positions."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from spb2_jax.ops.dtypes import acc_dtype


def rope_cos_sin(positions: jax.Array, head_dim: int, theta: float,
                 dtype=jnp.float32) -> tuple[jax.Array, jax.Array]:
    """cos/sin tables ``[..., head_dim // 2]`` in ``dtype`` (float32 default) for integer ``positions``."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=dtype) / head_dim))  # [H/2]
    angles = positions.astype(dtype)[..., None] * inv_freq  # [..., H/2]
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotate ``x [B, T, N, H]`` by ``positions [B, T]`` (NeoX half rotation, computed in float32)."""
    head_dim = x.shape[-1]
    acc = acc_dtype(x)
    cos, sin = rope_cos_sin(positions, head_dim, theta, acc)  # [B, T, H/2]
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]  # [B, T, 1, H/2]
    x32 = x.astype(acc)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)
