"""Reference MoBA (mixture of block attention): per-token top-k block selection, dense masks, O(T^2) memory.

Semantics (DESIGN.md): keys of each segment are split into blocks of ``chunk_size`` tokens counted from the
segment start. For every query token and query head, ``gate_n = q . mean(k in block n)`` (float32); the query
attends causally to its own block plus the ``topk - 1`` strictly earlier blocks with the largest gate (all of
them when fewer exist). GQA: a query head gates with the block means of its kv head.

Shape letters: see ``spb2_jax.parallel.rules``; lower-case ``n`` indexes the ``nblk`` blocks of a segment.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from einops import rearrange

from spb2_jax.ops.attention import attention_mask, dot_product_attention
from spb2_jax.ops.dtypes import acc_dtype
from spb2_jax.ops.segments import Segments, as_segments


def moba_selection(
    q: jax.Array,
    k: jax.Array,
    *,
    chunk_size: int,
    topk: int,
    segment_ids: Segments | jax.Array,
) -> jax.Array:
    """Selected blocks per query token and head: boolean ``[B, N, T, nblk]`` (block index within the segment)."""
    B, T, N, H = q.shape
    K = k.shape[2]
    seg = as_segments(segment_ids, B, T)
    nblk = -(-T // chunk_size)
    blk = seg.positions // chunk_size  # [B, T]
    # member[b, t, n, s]: key s is in block n of query t's segment
    labels = seg.labels
    same_seg = (labels[:, :, None] == labels[:, None, :]) & (labels[:, :, None] != 0)  # [B, T, S]
    member = same_seg[:, :, None, :] & (blk[:, None, None, :] == jnp.arange(nblk)[None, None, :, None])
    acc = acc_dtype(q, k)
    member = member.astype(acc)  # [B, T, nblk, S]
    count = jnp.maximum(member.sum(-1), 1.0)  # [B, T, nblk]
    kmean = jnp.einsum("BTnS,BSKH->BTnKH", member, k.astype(acc)) / count[..., None, None]
    qg = rearrange(q.astype(acc), "B T (K G) H -> B T K G H", K=K)
    gate = jnp.einsum("BTKGH,BTnKH->BKGTn", qg, kmean, precision=jax.lax.Precision.HIGHEST)
    gate = rearrange(gate, "B K G T n -> B (K G) T n")  # [B, N, T, nblk]
    own = blk[:, None, :, None] == jnp.arange(nblk)  # [B, 1, T, nblk]
    earlier = blk[:, None, :, None] > jnp.arange(nblk)
    n_pick = min(topk - 1, nblk)
    selected = jnp.broadcast_to(own, gate.shape)  # [B, N, T, nblk] also when topk == 1
    if n_pick > 0:
        masked = jnp.where(earlier, gate, -jnp.inf)
        _, idx = jax.lax.top_k(masked, n_pick)  # [B, N, T, n_pick]
        picked = jax.nn.one_hot(idx, nblk, dtype=bool).any(-2)
        selected = selected | (picked & earlier)
    return selected


def moba_attention_reference(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    chunk_size: int,
    topk: int,
    segment_ids: Segments | jax.Array | None = None,
    scale: float | None = None,
) -> jax.Array:
    """MoBA attention, ``q [B, T, N, H]``, ``k, v [B, T, K, H]`` -> ``[B, T, N, H]``; 0-segments are padding."""
    seg = as_segments(segment_ids, q.shape[0], q.shape[1])
    selected = moba_selection(q, k, chunk_size=chunk_size, topk=topk, segment_ids=seg)
    blk = seg.positions // chunk_size  # [B, S]
    key_selected = jnp.take_along_axis(
        selected, jnp.broadcast_to(blk[:, None, None, :], selected.shape[:3] + blk.shape[-1:]), axis=-1)
    mask = attention_mask(seg, causal=True)[:, None] & key_selected  # [B, N, T, S]
    return dot_product_attention(q, k, v, mask, scale=scale)
