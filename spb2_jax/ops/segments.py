"""Segment bookkeeping shared by the chunked recurrences.

The recurrences reset their state where a real token's segment differs from the previous real token's
segment (padding tokens, segment 0, are transparent; the first segment of a row keeps ``initial_state``).
``run_ids`` numbers these contiguous runs so that two tokens may interact iff their run ids are equal.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def run_ids(segment_ids: jax.Array) -> jax.Array:
    """``[B, T] int32``: 0 for the run that continues ``initial_state``, +1 at every state reset."""
    B, T = segment_ids.shape
    real = segment_ids != 0
    idx = jnp.arange(T, dtype=jnp.int32)
    last_real = jax.lax.cummax(jnp.where(real, idx, -1), axis=1)  # [B, T] index of last real token <= t
    prev_idx = jnp.concatenate([jnp.full((B, 1), -1, jnp.int32), last_real[:, :-1]], axis=1)
    prev_seg = jnp.where(prev_idx >= 0, jnp.take_along_axis(segment_ids, jnp.maximum(prev_idx, 0), axis=1), 0)
    change = real & (prev_seg != 0) & (segment_ids != prev_seg)
    return jnp.cumsum(change.astype(jnp.int32), axis=1)


def pad_time(x: jax.Array, multiple: int, value=0) -> jax.Array:
    """Pad axis 1 up to a multiple of ``multiple``."""
    T = x.shape[1]
    extra = (-T) % multiple
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[1] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)
