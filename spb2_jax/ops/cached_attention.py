"""Attention of new query tokens against a KV cache, with explicit positions (prefill pieces and decode steps).

A cache row holds the keys of one sequence's real tokens. Two layouts are used by ``spb2_jax.layers.cache``:
- *position-indexed* (full and MoBA layers): slot ``s`` holds the key at position ``s``; slots
  ``0 .. length-1`` are filled. A query at position ``p`` sees slots ``s <= p`` (after the new keys are written).
- *ring* (sliding window): slot ``p % W`` holds the last key with that residue, and ``pos [B, W]`` records its
  position (-1 = empty).

Shape letters (see ``spb2_jax.parallel.rules``): B batch, T new (query) tokens, S cache slots, N query heads,
K kv heads, G = N // K group, H head dim, C MoBA block; lower-case ``t`` is the length of a query tile, ``n``
the number of blocks / tiles.
Query tiles bound the dense score block at ``[B, N, tile, S]``; nothing here is ``O(T^2)`` in the piece length
for the position-indexed layout beyond ``T * S``.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from einops import rearrange

from spb2_jax.ops.attention import dot_product_attention
from spb2_jax.ops.dtypes import acc_dtype
from spb2_jax.ops.segments import pad_time

# query tile: at most this many score entries (B * N * tile * S) per tile
_SCORE_BUDGET = 1 << 24


def write_slots(buffer: jax.Array, new: jax.Array, slots: jax.Array, axis: int = 1) -> jax.Array:
    """``buffer[b, ..., slots[b, t], ...] = new[b, t]`` along ``axis`` for every row; slots outside the axis'
    range are dropped.

    Args:
      buffer: ``[B, ...]`` with the slot axis at ``axis``; new: ``[B, T, ...]`` (the other axes in order);
      slots: ``[B, T]`` int32 (use the axis' size to drop a token).
    """
    index = (slice(None),) * (axis - 1)

    def row(buf, x, i):
        return buf.at[index + (i,)].set(jnp.moveaxis(x, 0, axis - 1).astype(buf.dtype), mode="drop")

    return jax.vmap(row)(buffer, new, slots)


def add_slots(buffer: jax.Array, new: jax.Array, slots: jax.Array) -> jax.Array:
    """``buffer[b, slots[b, t]] += new[b, t]`` (duplicates accumulate); out-of-range slots are dropped."""
    return jax.vmap(lambda buf, x, i: buf.at[i].add(x.astype(buf.dtype), mode="drop"))(buffer, new, slots)


def query_tile(batch: int, heads: int, num_queries: int, num_keys: int) -> int:
    """Query tile length so that one tile's scores ``[B, N, tile, S]`` stay within a fixed budget."""
    return max(1, min(num_queries, _SCORE_BUDGET // max(1, batch * heads * num_keys)))


def tiled_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask_fn: Callable[[jax.Array, jax.Array], jax.Array],
    qpos: jax.Array,
) -> jax.Array:
    """Masked GQA attention of ``q [B, T, N, H]`` over ``k, v [B, S, K, H]``, one query tile at a time.

    ``mask_fn(q_tile [B, t, N, H], qpos_tile [B, t]) -> bool [B, t, S] or [B, N, t, S]`` builds the mask of a
    tile (padding queries are marked by ``qpos < 0`` and must see nothing). Statistics in float32; rows with no
    visible key are zero.
    """
    B, T, N, _ = q.shape
    tile = query_tile(B, N, T, k.shape[1])
    if tile >= T:
        return dot_product_attention(q, k, v, mask_fn(q, qpos))
    qt = rearrange(pad_time(q, tile), "B (n t) N H -> n B t N H", t=tile)
    pt = rearrange(pad_time(qpos, tile, value=-1), "B (n t) -> n B t", t=tile)
    out = jax.lax.map(lambda a: dot_product_attention(a[0], k, v, mask_fn(a[0], a[1])), (qt, pt))
    return rearrange(out, "n B t N H -> B (n t) N H")[:, :T]


def causal_slot_mask(qpos: jax.Array, num_slots: int, slots: jax.Array | None = None) -> jax.Array:
    """Position-indexed cache: query at ``p`` sees slots ``0..p``; ``[B, t, S]`` (``p < 0``: nothing).

    ``slots``: the slot indices the mask is for (default ``arange(num_slots)``; a shard of the cache passes its
    own)."""
    slots = jnp.arange(num_slots) if slots is None else slots
    return slots[None, None, :] <= qpos[..., None]


def moba_selection(
    q: jax.Array, qpos: jax.Array, block_sums: jax.Array, *, chunk_size: int, topk: int,
) -> tuple[jax.Array, jax.Array | None, jax.Array | None]:
    """The MoBA blocks a query tile sees: ``(own [B, t], picked [B, N, t, k'], ok [B, N, t, k'])``.

    The query at position ``p`` sees its own block (``p // C``) and the top-``k' = min(topk - 1, nblk)`` strictly
    earlier blocks by ``gate_n = q . block_sums[n] / C`` (earlier blocks are complete; float32, GQA: the query
    head's kv head; ties pick the lower block) -- exactly the per-token selection of the forward. ``ok`` is False
    where fewer than ``k'`` earlier blocks exist (that pick is void). ``picked, ok`` are None when ``k' = 0``.
    """
    nblk, K = block_sums.shape[1], block_sums.shape[2]
    C = chunk_size
    own = jnp.maximum(qpos, 0) // C  # [B, t]
    n_pick = min(topk - 1, nblk)
    if n_pick <= 0:
        return own, None, None
    acc = acc_dtype(q)
    qg = rearrange(q.astype(acc), "B t (K G) H -> B t K G H", K=K)
    means = block_sums.astype(acc) / C
    gate = jnp.einsum("BtKGH,BnKH->BKGtn", qg, means, precision=jax.lax.Precision.HIGHEST)
    gate = rearrange(gate, "B K G t n -> B (K G) t n")  # [B, N, t, nblk]
    earlier = jnp.arange(nblk)[None, None, None, :] < own[:, None, :, None]
    _, picked = jax.lax.top_k(jnp.where(earlier, gate, -jnp.inf), n_pick)
    ok = picked < own[:, None, :, None]
    return own, picked, ok


def moba_slot_mask(
    q: jax.Array, qpos: jax.Array, block_sums: jax.Array, *, num_slots: int, chunk_size: int, topk: int,
    slots: jax.Array | None = None,
) -> jax.Array:
    """MoBA mask of a query tile over a position-indexed cache of ``num_slots`` slots, ``[B, N, t, S]``
    (the blocks of ``moba_selection``, slots ``<= p``); ``slots`` as in ``causal_slot_mask``."""
    nblk, C = block_sums.shape[1], chunk_size
    slots = jnp.arange(num_slots) if slots is None else slots
    own, picked, ok = moba_selection(q, qpos, block_sums, chunk_size=C, topk=topk)
    blocks = jnp.arange(nblk)
    selected = blocks[None, None, None, :] == own[:, None, :, None]  # [B, 1, t, nblk]
    if picked is not None:
        selected = selected | (jax.nn.one_hot(picked, nblk, dtype=bool) & ok[..., None]).any(-2)
    slot_selected = jnp.take(selected, jnp.minimum(slots // C, nblk - 1), axis=-1)  # [B, N|1, t, S]
    return slot_selected & causal_slot_mask(qpos, num_slots, slots)[:, None]


def moba_gathered_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, qpos: jax.Array, block_sums: jax.Array, *, chunk_size: int,
    topk: int,
) -> jax.Array:
    """MoBA attention of a few queries (decode) that reads only the selected blocks of the cache.

    Same result as ``tiled_attention`` with ``moba_slot_mask``, but gathers the ``topk`` blocks of each query and
    head (``[B, N, t, topk * C, H]`` keys) instead of scoring all ``S`` slots: the cost per decoded token is
    ``O(S / C)`` for the gates plus ``O(topk * C)`` for the attention, not ``O(S)``.

    Args:
      q: ``[B, t, N, H]``; k, v: ``[B, K, S, H]`` position-indexed, kv-head major (the ``KVCache`` layout);
        qpos: ``[B, t]`` (-1 = padding query, output zero); block_sums: ``[B, ceil(S / C), K, H]``.
    """
    B, t, N, H = q.shape
    K, S = k.shape[1], k.shape[2]
    C = chunk_size
    own, picked, ok = moba_selection(q, qpos, block_sums, chunk_size=C, topk=topk)
    blocks = jnp.broadcast_to(own[:, None, :, None], (B, N, t, 1))
    usable = jnp.ones((B, N, t, 1), bool)
    if picked is not None:
        blocks = jnp.concatenate([blocks, picked], axis=-1)
        usable = jnp.concatenate([usable, ok], axis=-1)
    pos = rearrange(blocks[..., None] * C + jnp.arange(C), "B N t j c -> B N t (j c)")
    mask = jnp.repeat(usable, C, axis=-1) & (pos <= qpos[:, None, :, None]) & (pos < S)
    # gather the selected slots straight from the position-indexed cache (no copy of the whole cache)
    rows = jnp.arange(B)[:, None, None, None]
    heads = (jnp.arange(N) // (N // K))[None, :, None, None]
    slots = jnp.minimum(pos, S - 1)
    kg, vg = k[rows, heads, slots], v[rows, heads, slots]  # [B, N, t, topk * C, H]
    acc = acc_dtype(q, k, v)
    logits = jnp.einsum("BtNH,BNtsH->BNts", q, kg, preferred_element_type=acc) * H ** -0.5
    logits = jnp.where(mask, logits, -jnp.inf)
    peak = jnp.max(logits, axis=-1, keepdims=True)
    weights = jnp.where(mask, jnp.exp(logits - jnp.where(jnp.isfinite(peak), peak, 0.0)), 0.0)
    norm = jnp.sum(weights, axis=-1, keepdims=True)
    probs = weights / jnp.where(norm > 0, norm, 1.0)
    out = jnp.einsum("BNts,BNtsH->BtNH", probs, vg.astype(acc))
    return out.astype(q.dtype)


def window_key_mask(qpos: jax.Array, kpos: jax.Array, window: int) -> jax.Array:
    """Keys with explicit positions ``kpos [B, S]`` (-1 = empty): ``p - window < kpos <= p``, ``[B, t, S]``."""
    p = qpos[..., None]
    kp = kpos[:, None, :]
    return (kp >= 0) & (kp <= p) & (kp > p - window) & (p >= 0)
