"""Blockwise MoBA: per-token block selection, then attention over the selected blocks only.

1. Selection (``moba_select_blocks``): block means of the keys per (segment, block) with a segment sum
   (``O(T)``), then, one query tile at a time, ``gate = q . mean`` over the earlier blocks of the query's
   segment and their top-(k-1): compact index lists ``[B, T, N, k-1]`` (segment-relative block indices,
   -1 = none). Memory ``O(tile * T / C)`` per step.
2. Attention (``moba_attention``), by default in gathered form (``spb2_jax.ops.moba_gathered``: the own-block band
   plus the selected (token, block) pairs grouped by block; work ``T (C + (k - 1) C)`` per head). The
   ``algorithm="union"`` tile loop here (also the XLA full causal attention, ``causal_attention``): for every
   (query tile, key tile) pair a boolean "needed" table is built from the index lists (own block and selected
   blocks of any token/head of the query tile); a ``lax.scan`` over key tiles with ``lax.cond`` computes only
   needed pairs with an online softmax (float32 statistics) and the exact per-token mask. On real selections the
   union of a query tile's blocks is most of the causal prefix, so this is close to dense causal work; for full
   causal attention it skips exactly the tiles above the diagonal. Each query tile is under ``jax.checkpoint``
   so reverse mode recomputes it instead of storing every pair's probabilities.

Every ``jax.checkpoint`` inside a loop here and in the chunked recurrences uses ``prevent_cse=False`` (the
loop already prevents CSE): with the default optimisation barriers, gradients of models with several such
layers deadlocked the XLA CPU runtime (jax 0.10.2).

Shape letters: see ``spb2_jax.parallel.rules`` (C is the MoBA block here, ``bs`` the attention tile); in the
patterns lower-case ``t, s`` are query / key positions inside a tile, ``n`` counts tiles or blocks, and
``R = topk - 1`` is the number of picked earlier blocks.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from einops import rearrange

from pallas_kernels.block_sparse_flash import BlockSizes
from pallas_kernels.moba import moba_flash_attention
from pallas_kernels.sliding_window import causal_flash_attention
from spb2_jax.ops.dtypes import acc_dtype
from spb2_jax.ops.moba_gathered import moba_gathered_attention
from spb2_jax.ops.segments import Segments, as_segments, pad_time

_MASKED = -1e30


def segment_bounds(seg: Segments) -> tuple[jax.Array, jax.Array]:
    """Start index and end index (exclusive) of every token's segment in this array, ``[B, T]`` each."""
    B, T = seg.shape
    idx = jnp.arange(T, dtype=jnp.int32)
    start = idx - seg.positions
    labels = seg.labels
    is_end = jnp.concatenate([labels[:, 1:] != labels[:, :-1], jnp.ones((B, 1), bool)], axis=1)
    end = jax.lax.cummin(jnp.where(is_end, idx + 1, T), axis=1, reverse=True)
    return start, end


def moba_select_blocks(
    q: jax.Array, k: jax.Array, *, chunk_size: int, topk: int, segment_ids: Segments | jax.Array | None,
    tile: int = 64,
) -> jax.Array:
    """Top-(k-1) strictly earlier blocks per query token and head: ``[B, T, N, k-1]`` int32, -1 = none.

    Gates are ``q . mean(k in block)`` in float32 (GQA: the query head's kv head); ties pick the lower block.
    """
    B, T, N, H = q.shape
    K = k.shape[2]
    C = chunk_size
    R = topk - 1
    if R <= 0:
        return jnp.zeros((B, T, N, 0), jnp.int32)
    acc = acc_dtype(q, k)
    seg = as_segments(segment_ids, B, T)
    real = seg.real
    pos = seg.positions
    blk = pos // C
    bid = jnp.maximum(jnp.cumsum(real & (pos % C == 0), axis=1) - 1, 0)  # global block id of each token
    kr = jnp.where(real[..., None, None], k.astype(acc), 0.0)
    sums = jax.vmap(lambda x, i: jax.ops.segment_sum(x, i, num_segments=T))(kr, bid)  # [B, T, K, H]
    counts = jax.vmap(lambda x, i: jax.ops.segment_sum(x, i, num_segments=T))(real.astype(acc), bid)
    means = sums / jnp.maximum(counts, 1.0)[..., None, None]
    first = bid - blk  # id of block 0 of the token's segment
    nblk = -(-T // C)
    n_pick = min(R, nblk)
    bs = max(1, min(tile, T))
    qp = pad_time(q.astype(acc), bs)
    firstp, blkp = pad_time(first, bs), pad_time(blk, bs)
    nT = qp.shape[1] // bs

    def select_tile(args):
        qt, ft, bt, mt = args  # [B, bs, N, H], [B, bs], [B, bs], means [B, T, K, H]
        ids = jnp.clip(ft[..., None] + jnp.arange(nblk), 0, T - 1)  # [B, bs, nblk]
        cand = jax.vmap(lambda m, i: m[i])(mt, ids)  # [B, bs, nblk, K, H]
        qg = rearrange(qt, "B t (K G) H -> B t K G H", K=K)
        gate = jnp.einsum("BtKGH,BtnKH->BtKGn", qg, cand, precision=jax.lax.Precision.HIGHEST)
        gate = rearrange(gate, "B t K G n -> B t (K G) n")
        earlier = jnp.arange(nblk) < bt[..., None, None]  # [B, bs, 1, nblk]
        val, idx = jax.lax.top_k(jnp.where(earlier, gate, -jnp.inf), n_pick)
        return jnp.where(val > -jnp.inf, idx, -1).astype(jnp.int32)  # [B, bs, N, n_pick]

    tiles = (rearrange(qp, "B (n t) N H -> n B t N H", t=bs), rearrange(firstp, "B (n t) -> n B t", t=bs),
             rearrange(blkp, "B (n t) -> n B t", t=bs))
    sel = jax.lax.map(lambda a: select_tile(a + (means,)), tiles)  # [nT, B, bs, N, n_pick]
    sel = rearrange(sel, "n B t N r -> B (n t) N r")[:, :T]
    if n_pick < R:
        sel = jnp.concatenate([sel, jnp.full(sel.shape[:-1] + (R - n_pick,), -1, jnp.int32)], axis=-1)
    return sel


def needed_tiles(sel, blk, seg_start, seg_end, real, C, bs, nT):
    """Boolean ``[B, nT, nT]``: query tile i must visit key tile j (own block or a selected block)."""
    B, T, N, R = sel.shape
    idx = jnp.arange(T, dtype=jnp.int32)
    own_lo = seg_start + blk * C  # own block: keys [own_lo, t]
    lo = [own_lo[..., None]]
    hi = [idx[None, :, None] + jnp.zeros_like(own_lo)[..., None]]
    if R:
        g_lo = seg_start[..., None, None] + sel * C  # [B, T, N, R]
        g_hi = jnp.minimum(g_lo + C, seg_end[..., None, None]) - 1
        ok = sel >= 0
        lo.append(jnp.where(ok, g_lo, -1).reshape(B, T, N * R))
        hi.append(jnp.where(ok, g_hi, -1).reshape(B, T, N * R))
    lo = jnp.concatenate(lo, axis=-1)  # [B, T, 1 + N R] key index ranges [lo, hi], -1 = none
    hi = jnp.concatenate(hi, axis=-1)
    valid = (lo >= 0) & real[..., None]
    span = min(-(-C // bs) + 1, nT)  # key tiles one range can touch; offsets >= nT are past the end (lo >= 0)
    need = jnp.zeros((B, nT, nT), bool)
    qtile = jnp.broadcast_to((idx // bs)[None, :, None], lo.shape)
    bidx = jnp.broadcast_to(jnp.arange(B)[:, None, None], lo.shape)
    for o in range(span):
        kt = lo // bs + o
        ok = valid & (kt * bs <= hi) & (kt < nT)
        need = need.at[bidx, qtile, jnp.clip(kt, 0, nT - 1)].max(ok)
    return need


def moba_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    chunk_size: int,
    topk: int,
    segment_ids: Segments | jax.Array | None = None,
    scale: float | None = None,
    block_size: int = 128,
    impl: str = "xla",
    interpret: bool = False,
    target: str = "triton",
    algorithm: str | None = None,
) -> jax.Array:
    """MoBA attention that touches only the selected key blocks; equals ``moba_attention_reference``.

    Args:
      q: ``[B, T, N, H]``; k, v: ``[B, T, K, H]`` (GQA, ``N % K == 0``).
      chunk_size: MoBA block size C; topk: blocks per query token (own block included).
      segment_ids: ``[B, T]`` ids (0 = padding) or a ``Segments``; blocks restart at every segment start.
      scale: default ``H ** -0.5``. block_size: query/key tile size of the attention loop.
      impl: ``"xla"`` or ``"pallas"`` (``pallas_kernels.moba_flash_attention`` on the same selection; its tile
        is ``block_size`` rounded to a power of two, at most 128).
      algorithm: ``"gathered"`` (work = the own-block band + the selected (token, block) pairs:
        ``spb2_jax.ops.moba_gathered`` for XLA, ``pallas_kernels.moba_gathered`` on both Pallas targets),
        ``"union"`` (per query tile, the union of the key tiles its tokens selected: the tile loop below for
        XLA), None: ``"gathered"`` for Pallas; for XLA ``"gathered"`` unless ``2 topk C > T``, where the selected pairs
        are about the whole causal triangle (``topk C`` keys per token against ``T / 2`` on average) and the
        union loop, which computes that triangle once, is cheaper (``tools/moba_work.py``: 4096/12 at 64k).
      interpret, target: the Pallas kernels' mode and target.
    Returns:
      ``[B, T, N, H]`` in ``q.dtype``.
    """
    B, T, N, H = q.shape
    K = k.shape[2]
    if N % K:
        raise ValueError(f"query heads {N=} must be a multiple of kv heads {K=}")
    if chunk_size <= 0 or topk <= 0:
        raise ValueError(f"{chunk_size=} and {topk=} must be positive")
    if impl not in ("xla", "pallas"):
        raise ValueError(f"impl={impl!r} must be 'xla' or 'pallas'")
    if algorithm not in (None, "gathered", "union"):
        raise ValueError(f"algorithm={algorithm!r} must be 'gathered', 'union' or None")
    seg = as_segments(segment_ids, B, T)
    scale = H ** -0.5 if scale is None else scale
    C = chunk_size
    acc = acc_dtype(q, k, v)
    # integer selection: no gradient flows through it (stop_gradient keeps it out of the backward graph)
    sel = moba_select_blocks(jax.lax.stop_gradient(q), jax.lax.stop_gradient(k), chunk_size=C, topk=topk,
                             segment_ids=seg)  # [B, T, N, R]
    if impl == "pallas":
        return moba_flash_attention(q, k, v, sel=sel, seg=seg.labels, pos=seg.positions, chunk_size=C, scale=scale,
                                    block_sizes=BlockSizes.from_request(block_size, T), interpret=interpret,
                                    target=target, algorithm=algorithm)
    if algorithm is None:
        algorithm = "union" if 2 * topk * C > T else "gathered"
    if algorithm == "gathered":
        return moba_gathered_attention(q, k, v, sel, chunk_size=C, segment_ids=seg, scale=scale,
                                       block_size=block_size)
    real = seg.real
    blk = seg.positions // C
    seg_start, seg_end = segment_bounds(seg)
    bs = max(1, min(block_size, T))
    nT = -(-T // bs)
    need = needed_tiles(sel, blk, seg_start, seg_end, real, C, bs, nT)

    seg_p, blk_p, sel_p = pad_time(seg.labels, bs), pad_time(blk, bs), pad_time(sel, bs, -1)
    qp, kp, vp = (pad_time(x.astype(acc), bs) for x in (q, k, v))
    idx = jnp.arange(nT * bs, dtype=jnp.int32)

    def attend_row(row):
        q_r, k_r, v_r, seg_r, blk_r, sel_r, need_r = row

        def attend_tile(i):
            sl = lambda x: jax.lax.dynamic_slice_in_dim(x, i * bs, bs)  # noqa: E731
            qt = rearrange(sl(q_r), "t (K G) H -> t K G H", K=K) * scale
            st, bt, selt, it = sl(seg_r), sl(blk_r), sl(sel_r), sl(idx)

            def visit(carry, j):
                def compute(carry):
                    m, l, o = carry  # [t, N], [t, N], [t, N, H]
                    ks = lambda x: jax.lax.dynamic_slice_in_dim(x, j * bs, bs)  # noqa: E731
                    kt, vt, sk, bk, ik = ks(k_r), ks(v_r), ks(seg_r), ks(blk_r), ks(idx)
                    member = bk[None, None, :] == bt[:, None, None]  # own block [t, 1, s]
                    for r in range(selt.shape[-1]):
                        member = member | (selt[:, :, r, None] == bk[None, None, :])  # [t, N, s]
                    mask = member & ((st[:, None] == sk[None, :]) & (st[:, None] != 0)
                                     & (ik[None, :] <= it[:, None]))[:, None, :]
                    logits = rearrange(jnp.einsum("tKGH,sKH->tKGs", qt, kt), "t K G s -> t (K G) s")
                    logits = jnp.where(mask, logits, _MASKED)
                    m_new = jnp.maximum(m, logits.max(-1))
                    p = jnp.where(mask, jnp.exp(logits - m_new[..., None]), 0.0)
                    corr = jnp.exp(m - m_new)
                    pv = jnp.einsum("tKGs,sKH->tKGH", rearrange(p, "t (K G) s -> t K G s", K=K), vt)
                    o = o * corr[..., None] + rearrange(pv, "t K G H -> t (K G) H")
                    return m_new, l * corr + p.sum(-1), o

                return jax.lax.cond(need_r[i, j], compute, lambda c: c, carry), None

            init = (jnp.full((bs, N), _MASKED, acc), jnp.zeros((bs, N), acc), jnp.zeros((bs, N, H), acc))
            (m, l, o), _ = jax.lax.scan(visit, init, jnp.arange(nT))
            return jnp.where(l[..., None] > 0, o / jnp.where(l > 0, l, 1.0)[..., None], 0.0)

        return jax.lax.map(jax.checkpoint(attend_tile, prevent_cse=False), jnp.arange(nT))  # [nT, bs, N, H]

    out = jax.lax.map(attend_row, (qp, kp, vp, seg_p, blk_p, sel_p, need))
    return rearrange(out, "B n t N H -> B (n t) N H")[:, :T].astype(q.dtype)


def causal_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    segment_ids: Segments | jax.Array | None = None,
    scale: float | None = None,
    block_size: int = 128,
    impl: str = "xla",
    interpret: bool = False,
    target: str = "triton",
) -> jax.Array:
    """Tiled full causal GQA attention inside segments, memory O(T * block_size) per query tile.

    It is the MoBA tile loop with one block per segment (``topk = 1``, block = the whole sequence): every
    query's own block is all its earlier keys, so only key tiles at or before the query tile are visited.
    ``impl="pallas"``: ``pallas_kernels.causal_flash_attention`` (``interpret``, ``target`` as in
    ``moba_attention``).
    """
    B, T = q.shape[:2]
    seg = as_segments(segment_ids, B, T)
    if impl == "pallas":
        return causal_flash_attention(q, k, v, seg=seg.labels, scale=scale,
                                      block_sizes=BlockSizes.from_request(block_size, T), interpret=interpret,
                                      target=target)
    return moba_attention(q, k, v, chunk_size=max(T, 1), topk=1, segment_ids=seg, scale=scale,
                          block_size=block_size, impl=impl, algorithm="union")

