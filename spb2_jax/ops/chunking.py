"""Layout of chunked recurrences: ``[B, T, N, ...]`` <-> groups of chunks ``[m, n, B, N, C, ...]``.

A chunked scan works on chunks of ``C`` tokens; the fast paths batch the state-independent work of ``n``
consecutive chunks (a *group*) and scan over the ``m`` groups. ``plan_groups`` picks ``n`` close to the
requested group size such that padding adds fewer than ``m`` chunks (never a whole extra group). Padded tokens
are segment 0 (padding): zero inputs, which every recurrence treats as exact no-ops.

Shape letters: see ``spb2_jax.parallel.rules`` (N heads, E value head dim); ``m`` and ``n`` are counts.
"""

from __future__ import annotations

import math

import jax
from einops import rearrange

from spb2_jax.ops.segments import chunk_runs, pad_time


def plan_groups(T: int, chunk_size: int, group: int) -> tuple[int, int]:
    """``(m, n)``: ``m`` groups of ``n`` chunks of ``chunk_size`` tokens covering ``T`` tokens with the least
    padding for ``m = ceil(chunks / group)``."""
    if chunk_size <= 0 or group <= 0:
        raise ValueError(f"chunk_size={chunk_size} and group={group} must be positive")
    chunks = max(math.ceil(T / chunk_size), 1)
    m = math.ceil(chunks / group)
    return m, math.ceil(chunks / m)


def chunk_groups(arrays, labels: jax.Array, chunk_size: int, group: int) -> tuple[jax.Array, ...]:
    """Lay out ``[B, T, N, ...]`` arrays as ``[m, n, B, N, C, ...]`` and append the run ids of the chunks,
    ``runs [m, n, B, C]`` and ``run_before [m, n, B]``, from the segment ``labels [B, T]`` (see
    ``segments.chunk_runs``)."""
    T = labels.shape[1]
    m, n = plan_groups(T, chunk_size, group)
    size = m * n * chunk_size
    out = tuple(rearrange(pad_time(x, size), "B (m n C) N ... -> m n B N C ...", n=n, C=chunk_size)
                for x in arrays)
    runs, run_before = chunk_runs(pad_time(labels, size), chunk_size)
    return out + (runs.reshape(m, n, *runs.shape[1:]), run_before.reshape(m, n, *run_before.shape[1:]))


def from_groups(o: jax.Array, T: int) -> jax.Array:
    """Inverse layout of ``chunk_groups`` for an output ``[m, n, B, N, C, E]``: ``[B, T, N, E]``."""
    return rearrange(o, "m n B N C E -> B (m n C) N E")[:, :T]
