"""Segments: the JAX form of ``cu_seqlens``.

``segment_ids [B, T]`` (0 = padding). A *segment* is a maximal run of consecutive tokens with the same nonzero
id; padding or a change of id ends it. Tokens mix (attention, MoBA, SWA, recurrences) only inside a segment;
positions restart at 0 at every segment start. Recurrences start every segment from a zero state, except the
first segment of each row, which continues ``initial_state`` (so a left-padded row keeps it).

An HF ``attention_mask`` with left or right padding is therefore exactly the official unpadded semantics;
zeros *inside* a row would split it into two segments.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def segment_starts(segment_ids: jax.Array) -> jax.Array:
    """Boolean ``[B, T]``: the token starts a segment (real, and first of the row or its id differs)."""
    prev = jnp.concatenate([jnp.zeros_like(segment_ids[:, :1]), segment_ids[:, :-1]], axis=1)
    return (segment_ids != 0) & (segment_ids != prev)


def segment_labels(segment_ids: jax.Array) -> jax.Array:
    """``[B, T] int32``: 0 for padding, ``k`` for the k-th segment of the row (1-based)."""
    labels = jnp.cumsum(segment_starts(segment_ids).astype(jnp.int32), axis=1)
    return jnp.where(segment_ids != 0, labels, 0)


def segment_positions(segment_ids: jax.Array) -> jax.Array:
    """Position of every token inside its segment, ``[B, T] int32`` (padding: distance from its own run start)."""
    T = segment_ids.shape[-1]
    idx = jnp.arange(T, dtype=jnp.int32)
    is_start = jnp.concatenate(
        [jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    return idx - jax.lax.cummax(jnp.where(is_start, idx, 0), axis=1)


def run_ids(segment_ids: jax.Array) -> jax.Array:
    """``[B, T] int32`` state-run index for chunked recurrences: the segment label, carried forward over
    padding (which is a no-op), with leading padding merged into the first segment (run 1, which owns
    ``initial_state``). Two tokens share a recurrent state iff their run ids are equal."""
    return jnp.maximum(jax.lax.cummax(segment_labels(segment_ids), axis=1), 1)


def pad_time(x: jax.Array, multiple: int, value=0) -> jax.Array:
    """Pad axis 1 up to a multiple of ``multiple``."""
    T = x.shape[1]
    extra = (-T) % multiple
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[1] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)


def chunk_runs(segment_ids: jax.Array, chunk_size: int) -> tuple[jax.Array, jax.Array]:
    """Run ids laid out for a chunked scan: ``runs [n, B, C]`` (the padded tail continues the last run; it holds
    only no-op tokens) and ``run_before [n, B]``, the run that owns the state entering each chunk (run 1, which
    owns ``initial_state``, for the first chunk)."""
    B, T = segment_ids.shape
    C = chunk_size
    runs = pad_time(run_ids(segment_ids), C)
    if runs.shape[1] > T:
        runs = runs.at[:, T:].set(runs[:, T - 1:T])
    run_before = jnp.concatenate([jnp.ones((B, 1), runs.dtype), runs[:, C - 1:-1:C]], axis=1)  # [B, n]
    return jnp.moveaxis(runs.reshape(B, -1, C), 1, 0), jnp.moveaxis(run_before, 1, 0)
