"""Reference softmax attention (dense masks, O(T^2) memory) with GQA, causal / sliding-window / segment masks.

Shape letters (see ``spb2_jax.parallel.rules``): B batch, T query time, S key time, N query heads, K kv heads,
G = N // K group, H head dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from einops import rearrange

from spb2_jax.ops.dtypes import acc_dtype
from spb2_jax.ops.segments import Segments, as_segments

_MASKED = -1e30  # finite, so fully-masked rows give a finite softmax that is then zeroed


def attention_mask(
    segments: Segments | jax.Array,
    *,
    causal: bool = True,
    window: int | None = None,
) -> jax.Array:
    """Boolean ``[B, T, T]``: query i may see key j (same segment, j <= i, i - j < window)."""
    B, T = segments.shape
    labels = as_segments(segments, B, T).labels
    i = jnp.arange(T)[:, None]
    j = jnp.arange(T)[None, :]
    mask = (labels[:, :, None] == labels[:, None, :]) & (labels[:, :, None] != 0)  # [B, T, S]
    if causal:
        mask &= j <= i
    if window is not None:
        mask &= (i - j) < window
    return mask


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array,
    *,
    scale: float | None = None,
) -> jax.Array:
    """Masked softmax attention; statistics in float32.

    Args:
      q: ``[B, T, N, H]``; k, v: ``[B, S, K, H]`` with ``N % K == 0`` (GQA).
      mask: boolean, ``[B, T, S]`` (shared by heads) or ``[B, N, T, S]`` (per query head).
      scale: softmax scale, default ``H ** -0.5``.
    Returns:
      ``[B, T, N, H]`` in ``q.dtype``; rows with no visible key are zero.
    """
    B, T, N, H = q.shape
    K = k.shape[2]
    if N % K:
        raise ValueError(f"query heads {N=} must be a multiple of kv heads {K=}")
    scale = H ** -0.5 if scale is None else scale
    qg = rearrange(q, "B T (K G) H -> B K G T H", K=K)
    acc = acc_dtype(q, k, v)
    logits = jnp.einsum("BKGTH,BSKH->BKGTS", qg, k, preferred_element_type=acc) * scale
    if mask.ndim == 3:
        m = mask[:, None, None]  # [B, 1, 1, T, S]
    else:
        m = rearrange(mask, "B (K G) T S -> B K G T S", K=K)
    logits = jnp.where(m, logits, _MASKED)
    probs = jax.nn.softmax(logits, axis=-1)
    probs = jnp.where(m, probs, 0.0)
    out = jnp.einsum("BKGTS,BSKH->BTKGH", probs, v.astype(acc))
    return rearrange(out, "B T K G H -> B T (K G) H").astype(q.dtype)


def attention_reference(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    segment_ids: Segments | jax.Array | None = None,
    causal: bool = True,
    window: int | None = None,
    scale: float | None = None,
) -> jax.Array:
    """Causal (optionally sliding-window) GQA attention that never mixes segments (0 = padding).

    ``segment_ids``: ``[B, T]`` ids or a ``Segments`` (what the model passes)."""
    segments = as_segments(segment_ids, q.shape[0], q.shape[1])
    return dot_product_attention(q, k, v, attention_mask(segments, causal=causal, window=window), scale=scale)
