"""Segments: the JAX form of ``cu_seqlens``.

``segment_ids [B, T]`` (0 = padding). A *segment* is a maximal run of consecutive tokens with the same nonzero
id; padding or a change of id ends it. Tokens mix (attention, MoBA, SWA, recurrences) only inside a segment;
positions restart at 0 at every segment start. Recurrences start every segment from a zero state, except the
first segment of each row, which continues ``initial_state`` (so a left-padded row keeps it).

An HF ``attention_mask`` with left or right padding is therefore exactly the official unpadded semantics;
zeros *inside* a row would split it into two segments.

``Segments`` is what every op receives: built ONCE per forward by the model (``Segments.from_ids``) and passed
down, so that an op never re-derives labels or positions from the ids it sees. Under sequence parallelism a
device holds a slice of the time axis; the slice of a ``Segments`` keeps the GLOBAL labels and positions, which
a slice of the ids alone could not give.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class Segments:
    """Segment metadata of a batch, every field ``[B, T] int32``.

    Attributes:
      ids: segment ids as given (0 = padding).
      labels: 0 for padding, k for the k-th segment of the row (1-based, counted from the row start).
      positions: position of every token inside its segment (0 at the segment start; the RoPE position).
      mrope: None, or ``[B, T, 3] int32`` M-RoPE positions (t, h, w) of a VL prompt, which then replace
        ``positions`` in the rotary of every attention (``spb2_jax.ops.rope.rotate``).
    """

    ids: jax.Array
    labels: jax.Array
    positions: jax.Array
    mrope: jax.Array | None = None

    @classmethod
    def from_ids(cls, segment_ids: jax.Array) -> "Segments":
        """Labels and positions of ``segment_ids [B, T]`` (the whole rows: call it before any slicing)."""
        ids = jnp.asarray(segment_ids, jnp.int32)
        if ids.ndim != 2:
            raise ValueError(f"segment_ids must be [batch, time], got shape {ids.shape}")
        return cls(ids=ids, labels=segment_labels(ids), positions=segment_positions(ids))

    @property
    def shape(self) -> tuple[int, ...]:
        return self.ids.shape

    @property
    def real(self) -> jax.Array:
        """``[B, T]`` bool: the token is not padding."""
        return self.ids != 0


def as_segments(segment_ids: "jax.Array | Segments | None", batch: int, length: int) -> Segments:
    """The ``Segments`` an op works with: passed through, built from ids, or one segment per row (None).

    Public ops accept either form; the model always passes a ``Segments`` built once per forward."""
    if isinstance(segment_ids, Segments):
        seg = segment_ids
    elif segment_ids is None:
        seg = Segments.from_ids(jnp.ones((batch, length), jnp.int32))
    else:
        seg = Segments.from_ids(segment_ids)
    if seg.shape != (batch, length):
        raise ValueError(f"segment_ids shape {seg.shape} != (batch, time) = {(batch, length)} of the inputs")
    return seg


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


def run_ids(labels: jax.Array) -> jax.Array:
    """``[B, T] int32`` state-run index for chunked recurrences from segment ``labels``: the label, carried
    forward over padding (which is a no-op), with leading padding merged into the first segment (run 1, which
    owns ``initial_state``). Two tokens share a recurrent state iff their run ids are equal."""
    return jnp.maximum(jax.lax.cummax(labels, axis=1), 1)


def pad_time(x: jax.Array, multiple: int, value=0) -> jax.Array:
    """Pad axis 1 up to a multiple of ``multiple``."""
    T = x.shape[1]
    extra = (-T) % multiple
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[1] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)


def chunk_runs(labels: jax.Array, chunk_size: int) -> tuple[jax.Array, jax.Array]:
    """Run ids of segment ``labels [B, T]`` laid out for a chunked scan: ``runs [n, B, C]`` (the padded tail
    continues the last run; it holds only no-op tokens) and ``run_before [n, B]``, the run that owns the state
    entering each chunk (run 1, which owns ``initial_state``, for the first chunk)."""
    B, T = labels.shape
    C = chunk_size
    runs = pad_time(run_ids(labels), C)
    if runs.shape[1] > T:
        runs = runs.at[:, T:].set(runs[:, T - 1:T])
    run_before = jnp.concatenate([jnp.ones((B, 1), runs.dtype), runs[:, C - 1:-1:C]], axis=1)  # [B, n]
    return jnp.moveaxis(runs.reshape(B, -1, C), 1, 0), jnp.moveaxis(run_before, 1, 0)
