"""Attention of new query tokens against a KV cache, with explicit positions (prefill pieces and decode steps).

A cache row holds the keys of one sequence's real tokens. Two layouts are used by ``spb2_jax.layers.cache``:
- *position-indexed* (full and MoBA layers): slot ``s`` holds the key at position ``s``; slots
  ``0 .. length-1`` are filled. A query at position ``p`` sees slots ``s <= p`` (after the new keys are written).
- *ring* (sliding window): slot ``p % W`` holds the last key with that residue, and ``pos [B, W]`` records its
  position (-1 = empty).

Letters: B batch, T new (query) tokens, S cache slots, N query heads, K kv heads, H head dim, C MoBA block.
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


def write_slots(buffer: jax.Array, new: jax.Array, slots: jax.Array) -> jax.Array:
    """``buffer[b, slots[b, t]] = new[b, t]`` for every row; slots outside ``[0, S)`` are dropped.

    Args:
      buffer: ``[B, S, ...]``; new: ``[B, T, ...]``; slots: ``[B, T]`` int32 (use ``S`` to drop a token).
    """
    return jax.vmap(lambda buf, x, i: buf.at[i].set(x.astype(buf.dtype), mode="drop"))(buffer, new, slots)


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


def causal_slot_mask(qpos: jax.Array, num_slots: int) -> jax.Array:
    """Position-indexed cache: query at ``p`` sees slots ``0..p``; ``[B, t, S]`` (``p < 0``: nothing)."""
    return jnp.arange(num_slots)[None, None, :] <= qpos[..., None]


def moba_slot_mask(
    q: jax.Array, qpos: jax.Array, block_sums: jax.Array, *, num_slots: int, chunk_size: int, topk: int,
) -> jax.Array:
    """MoBA mask of a query tile over a position-indexed cache of ``num_slots`` slots, ``[B, N, t, S]``.

    The query at position ``p`` sees its own block's slots ``<= p`` and the slots of the top-(k-1) strictly
    earlier blocks by ``gate_n = q . block_sums[n] / C`` (earlier blocks are complete; float32, GQA: the query
    head's kv head; ties pick the lower block), exactly the per-token selection of the forward.
    """
    B, t, N, H = q.shape
    nblk, K = block_sums.shape[1], block_sums.shape[2]
    C = chunk_size
    S = num_slots
    own = jnp.maximum(qpos, 0) // C  # [B, t]
    blocks = jnp.arange(nblk)
    selected = blocks[None, None, None, :] == own[:, None, :, None]  # [B, 1, t, nblk]
    n_pick = min(topk - 1, nblk)
    if n_pick > 0:
        acc = acc_dtype(q)
        qg = rearrange(q.astype(acc), "B t (K G) H -> B t K G H", K=K)
        means = block_sums.astype(acc) / C
        gate = jnp.einsum("BtKGH,BnKH->BKGtn", qg, means, precision=jax.lax.Precision.HIGHEST)
        gate = rearrange(gate, "B K G t n -> B (K G) t n")  # [B, N, t, nblk]
        earlier = blocks[None, None, None, :] < own[:, None, :, None]
        _, idx = jax.lax.top_k(jnp.where(earlier, gate, -jnp.inf), n_pick)
        picked = jax.nn.one_hot(idx, nblk, dtype=bool).any(-2) & earlier
        selected = selected | picked
    slot_selected = jnp.repeat(selected, C, axis=-1)[..., :S]  # [B, N|1, t, S]
    return slot_selected & causal_slot_mask(qpos, S)[:, None]


def window_key_mask(qpos: jax.Array, kpos: jax.Array, window: int) -> jax.Array:
    """Keys with explicit positions ``kpos [B, S]`` (-1 = empty): ``p - window < kpos <= p``, ``[B, t, S]``."""
    p = qpos[..., None]
    kp = kpos[:, None, :]
    return (kp >= 0) & (kp <= p) & (kp > p - window) & (p >= 0)
