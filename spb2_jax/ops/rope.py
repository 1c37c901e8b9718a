"""Rotary position embedding (NeoX "rotate half" layout over the whole head dim) from explicit positions."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def rope_cos_sin(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """cos/sin tables ``[..., head_dim // 2]`` (float32) for integer ``positions`` of any shape."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))  # [H/2]
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [..., H/2]
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotate ``x [B, T, N, H]`` by ``positions [B, T]`` (NeoX half rotation, computed in float32)."""
    head_dim = x.shape[-1]
    cos, sin = rope_cos_sin(positions, head_dim, theta)  # [B, T, H/2]
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]  # [B, T, 1, H/2]
    x32 = x.astype(jnp.float32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)
