"""Rotary position embedding (NeoX "rotate half" layout over the whole head dim) from explicit positions."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from spb2_jax.ops.dtypes import acc_dtype


def rope_cos_sin(positions: jax.Array, head_dim: int, theta: float,
                 dtype=jnp.float32) -> tuple[jax.Array, jax.Array]:
    """cos/sin tables ``[..., head_dim // 2]`` in ``dtype`` (float32 default) for integer ``positions``."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=dtype) / head_dim))  # [H/2]
    angles = positions.astype(dtype)[..., None] * inv_freq  # [..., H/2]
    return jnp.cos(angles), jnp.sin(angles)


def mrope_cos_sin(positions: jax.Array, head_dim: int, theta: float, section,
                  dtype=jnp.float32) -> tuple[jax.Array, jax.Array]:
    """Interleaved M-RoPE cos/sin ``[B, T, head_dim // 2]`` for ``positions [B, T, 3]`` (t, h, w): frequency ``j``
    reads channel h when ``j % 3 == 1`` and ``j < 3 section[1]``, w when ``j % 3 == 2`` and ``j < 3 section[2]``,
    else t (the official VL text rotary; host twin ``spb2_jax.vision.positions.mrope_angles``)."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=dtype) / head_dim))  # [H/2]
    j = np.arange(head_dim // 2)
    channel = np.where((j % 3 == 1) & (j < 3 * section[1]), 1, np.where((j % 3 == 2) & (j < 3 * section[2]), 2, 0))
    angles = jnp.take(positions, channel, axis=-1).astype(dtype) * inv_freq  # [B, T, H/2]
    return jnp.cos(angles), jnp.sin(angles)


def rotate(x: jax.Array, segments, theta: float, mrope_section=None) -> jax.Array:
    """The attention rotary of ``x [B, T, N, H]``: M-RoPE from ``segments.mrope`` when the model has an
    ``mrope_section`` (VL text stacks) and the positions are given, else 1-D RoPE from ``segments.positions``
    (what M-RoPE is when the three channels are equal: text without images)."""
    if mrope_section is None or segments.mrope is None:
        return apply_rope(x, segments.positions, theta)
    cos, sin = mrope_cos_sin(segments.mrope, x.shape[-1], theta, mrope_section, acc_dtype(x))
    return _rotate_half(x, cos, sin)


def apply_rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotate ``x [B, T, N, H]`` by ``positions [B, T]`` (NeoX half rotation, computed in float32)."""
    cos, sin = rope_cos_sin(positions, x.shape[-1], theta, acc_dtype(x))  # [B, T, H/2]
    return _rotate_half(x, cos, sin)


def _rotate_half(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    acc = acc_dtype(x)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]  # [B, T, 1, H/2]
    x32 = x.astype(acc)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)
