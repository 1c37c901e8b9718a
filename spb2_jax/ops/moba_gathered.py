"""MoBA in gathered form on the XLA path: the work is the own-block band plus the selected (token, block) pairs.

The blockwise path (``moba_blockwise.moba_attention``) visits, per query tile, the union of the key tiles its
tokens selected, which on real selections is most of the causal prefix. Here each token's attention is split in
two parts whose softmax statistics are merged per token by log-sum-exp (``pallas_kernels.moba_gathered``'s
decomposition and metadata, evaluated with XLA ops):

A. **Own block** (causal inside the block): query tile ``i`` (``bs`` tokens) against the ``W`` key tiles ending at
   tile ``i``, ``W = ceil((C - 1) / bs) + 1`` — every key a token of the tile can need, since its own block starts at
   most ``C - 1`` tokens back. Masked to the token's block of its segment, causal. Work ``T (C + bs)``.
B. **Selected earlier blocks**: every (token, head, selected block) pair is a row; rows are grouped by block into
   tiles of ``bs`` rows (``selected_block_rows``), the queries gathered into that order, and each row tile attends
   to the ``C`` keys of its block (all visible: a selected block is complete, strictly earlier and in the
   token's segment). Work ``T (k - 1) C`` per head plus at most ``bs - 1`` padding rows per block.

Memory is linear in T: part A holds one query tile's ``[bs, W bs]`` scores at a time, part B one row tile's
``[bs, C]``; the gathered rows are ``T (k - 1)`` per head. The backward (custom VJP) recomputes both parts from the
merged output and log-sum-exp (every pair's probability is ``exp(s - lse)``), accumulating dK / dV in place in a
``lax.scan`` carry, so nothing per tile is stored.

Shape letters: see ``spb2_jax.parallel.rules``; ``bs`` is the tile, ``W bs`` part A's key window, ``P`` part B's
rows per (batch row, head) and ``nP = P / bs`` its row tiles.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from einops import rearrange

from pallas_kernels.moba_gathered import gather_rows, merge_parts, scatter_rows, selected_block_rows
from spb2_jax.ops.dtypes import acc_dtype
from spb2_jax.ops.segments import Segments, as_segments, pad_time

_MASKED = -1e30


def _band(T: int, C: int, bs: int) -> tuple[int, int]:
    """Part A's window: ``W`` key tiles per query tile and the front padding ``(W - 1) bs`` of K / V."""
    W = min(T // bs, -(-(C - 1) // bs) + 1)
    return W, (W - 1) * bs


def _band_tile(i, q, kf, vf, labels, lf, blk, bf, scale, bs, W):
    """Query tile ``i``: queries ``[B, bs, K, G, H]`` (scaled), the key window ``[B, W bs, K, H]`` (K / V front-padded
    by ``(W - 1) bs``), scores ``[B, bs, K, G, W bs]`` and the own-block causal mask ``[B, bs, 1, 1, W bs]``."""
    K = kf.shape[2]
    q_sl = lambda x: jax.lax.dynamic_slice_in_dim(x, i * bs, bs, axis=1)  # noqa: E731
    k_sl = lambda x: jax.lax.dynamic_slice_in_dim(x, i * bs, W * bs, axis=1)  # noqa: E731 (front-padded coords)
    qt = rearrange(q_sl(q), "B t (K G) H -> B t K G H", K=K) * scale
    kt, vt = k_sl(kf), k_sl(vf)
    ql, qb, kl, kb = q_sl(labels), q_sl(blk), k_sl(lf), k_sl(bf)
    causal = jnp.arange(W * bs)[None, :] <= jnp.arange(bs)[:, None] + (W - 1) * bs  # [t, s]
    mask = (ql[:, :, None] == kl[:, None, :]) & (ql != 0)[:, :, None] & (qb[:, :, None] == kb[:, None, :]) & causal
    s = jnp.einsum("BtKGH,BsKH->BtKGs", qt, kt, precision=jax.lax.Precision.HIGHEST)
    return qt, kt, vt, s, mask[:, :, None, None, :]


def _band_forward(q, kf, vf, labels, lf, blk, bf, scale, bs, W):
    """Part A: ``(o [B, T, N, H], lse [B, N, T])`` in the accumulation dtype (tokens with no keys, i.e. padding: 0 and 0)."""
    B, T, N, H = q.shape

    def tile(i):
        _, _, vt, s, mask = _band_tile(i, q, kf, vf, labels, lf, blk, bf, scale, bs, W)
        s = jnp.where(mask, s, _MASKED)
        m = s.max(-1)
        p = jnp.where(mask, jnp.exp(s - m[..., None]), 0.0)
        l = p.sum(-1)
        o = jnp.einsum("BtKGs,BsKH->BtKGH", p, vt, precision=jax.lax.Precision.HIGHEST)
        live = l > 0
        o = jnp.where(live[..., None], o / jnp.where(live, l, 1.0)[..., None], 0.0)
        lse = jnp.where(live, m + jnp.log(jnp.where(live, l, 1.0)), 0.0)
        return rearrange(o, "B t K G H -> B t (K G) H"), rearrange(lse, "B t K G -> B (K G) t")

    o, lse = jax.lax.map(tile, jnp.arange(T // bs))  # [nT, B, bs, N, H], [nT, B, N, bs]
    return rearrange(o, "n B t N H -> B (n t) N H"), rearrange(lse, "n B N t -> B N (n t)")


def _band_backward(q, kf, vf, labels, lf, blk, bf, lse, do, delta, scale, bs, W):
    """Part A's ``(dq [B, T, N, H], dk, dv [B, front + T, K, H])`` given the merged ``lse``, ``delta``
    ``[B, N, T]`` and ``do``; dK / dV windows accumulate in place (a scan carry)."""
    B, T, N, H = q.shape
    K = kf.shape[2]
    lse_t = rearrange(lse, "B (K G) T -> B T K G", K=K)
    delta_t = rearrange(delta, "B (K G) T -> B T K G", K=K)
    do_t = rearrange(do, "B T (K G) H -> B T K G H", K=K)

    def tile(carry, i):
        dk, dv = carry
        qt, kt, vt, s, mask = _band_tile(i, q, kf, vf, labels, lf, blk, bf, scale, bs, W)
        sl = lambda x: jax.lax.dynamic_slice_in_dim(x, i * bs, bs, axis=1)  # noqa: E731
        lse_i, delta_i, do_i = sl(lse_t), sl(delta_t), sl(do_t)
        p = jnp.where(mask, jnp.exp(s - lse_i[..., None]), 0.0)  # [B, t, K, G, s]
        dp = jnp.einsum("BtKGH,BsKH->BtKGs", do_i, vt, precision=jax.lax.Precision.HIGHEST)
        ds = p * (dp - delta_i[..., None])
        dq = jnp.einsum("BtKGs,BsKH->BtKGH", ds, kt, precision=jax.lax.Precision.HIGHEST) * scale
        dk_w = jnp.einsum("BtKGs,BtKGH->BsKH", ds, qt, precision=jax.lax.Precision.HIGHEST)  # qt carries the scale
        dv_w = jnp.einsum("BtKGs,BtKGH->BsKH", p, do_i, precision=jax.lax.Precision.HIGHEST)
        add = lambda acc, x: jax.lax.dynamic_update_slice_in_dim(  # noqa: E731
            acc, jax.lax.dynamic_slice_in_dim(acc, i * bs, W * bs, axis=1) + x, i * bs, axis=1)
        return (add(dk, dk_w), add(dv, dv_w)), rearrange(dq, "B t K G H -> B t (K G) H")

    zeros = jnp.zeros_like(kf)
    (dk, dv), dq = jax.lax.scan(tile, (zeros, zeros), jnp.arange(T // bs))
    return rearrange(dq, "n B t N H -> B (n t) N H"), dk, dv


def _rows_tile(q_rows, live, lo, hi, k_h, v_h, C, scale):
    """One row tile of one head: scores ``[bs, C]`` of its (scaled) queries against the block ``[lo, hi)``."""
    kt = jax.lax.dynamic_slice_in_dim(k_h, lo, C)
    vt = jax.lax.dynamic_slice_in_dim(v_h, lo, C)
    mask = live[:, None] & (lo + jnp.arange(C) < hi)[None, :]
    s = jnp.einsum("tH,sH->ts", q_rows * scale, kt, precision=jax.lax.Precision.HIGHEST)
    return kt, vt, s, mask


def _rows_forward(q_g, live, lo, hi, k_h, v_h, C, scale, bs, T):
    """Part B of one head: rows ``q_g [P, H]`` -> ``(o [P, H], lse [P])``. Unused row tiles (``lo = T``) are
    skipped by a ``lax.cond``; under the ``vmap`` over (batch row, head) in ``_attend`` that becomes a select, so
    all ``row_capacity`` tiles are computed (counted as such in ``tools/moba_work.py``)."""
    P, H = q_g.shape

    def tile(args):
        qt, lt, a, b = args

        def compute(_):
            _, vt, s, mask = _rows_tile(qt, lt, a, b, k_h, v_h, C, scale)
            s = jnp.where(mask, s, _MASKED)
            m = s.max(-1)
            p = jnp.where(mask, jnp.exp(s - m[:, None]), 0.0)
            l = p.sum(-1)
            o = jnp.einsum("ts,sH->tH", p, vt, precision=jax.lax.Precision.HIGHEST)
            ok = l > 0
            return (jnp.where(ok[:, None], o / jnp.where(ok, l, 1.0)[:, None], 0.0),
                    jnp.where(ok, m + jnp.log(jnp.where(ok, l, 1.0)), _MASKED))

        empty = (jnp.zeros((bs, H), q_g.dtype), jnp.full((bs,), _MASKED, q_g.dtype))
        return jax.lax.cond(a < T, compute, lambda _: empty, None)

    o, lse = jax.lax.map(tile, (q_g.reshape(-1, bs, H), live.reshape(-1, bs), lo, hi))
    return o.reshape(P, H), lse.reshape(P)


def _rows_backward(q_g, live, lo, hi, k_h, v_h, do_g, lse_g, delta_g, C, scale, bs, T):
    """Part B of one head: ``(dq rows [P, H], dk, dv [T + C, H])``; dK / dV accumulate in place."""
    P, H = q_g.shape

    def tile(carry, args):
        qt, lt, a, b, do_t, lse_t, delta_t = args

        def compute(carry):
            dk, dv = carry
            kt, vt, s, mask = _rows_tile(qt, lt, a, b, k_h, v_h, C, scale)
            p = jnp.where(mask, jnp.exp(s - lse_t[:, None]), 0.0)
            dp = jnp.einsum("tH,sH->ts", do_t, vt, precision=jax.lax.Precision.HIGHEST)
            ds = p * (dp - delta_t[:, None])
            dq = jnp.einsum("ts,sH->tH", ds, kt, precision=jax.lax.Precision.HIGHEST) * scale
            add = lambda acc, x: jax.lax.dynamic_update_slice_in_dim(  # noqa: E731
                acc, jax.lax.dynamic_slice_in_dim(acc, a, C) + x, a, axis=0)
            dk = add(dk, jnp.einsum("ts,tH->sH", ds, qt, precision=jax.lax.Precision.HIGHEST) * scale)
            dv = add(dv, jnp.einsum("ts,tH->sH", p, do_t, precision=jax.lax.Precision.HIGHEST))
            return (dk, dv), dq

        return jax.lax.cond(a < T, compute, lambda c: (c, jnp.zeros((bs, H), q_g.dtype)), carry)

    zeros = jnp.zeros_like(k_h)
    tiles = lambda x: x.reshape((-1, bs) + x.shape[1:])  # noqa: E731
    (dk, dv), dq = jax.lax.scan(tile, (zeros, zeros), (tiles(q_g), tiles(live), lo, hi, tiles(do_g),
                                                       tiles(lse_g), tiles(delta_g)))
    return dq.reshape(P, H), dk, dv


def _prepare(k, v, labels, blk, C, bs):
    """Part A's window ``W`` and its inputs front-padded by ``(W - 1) bs``: K, V, segment labels, block ids."""
    W, front = _band(k.shape[1], C, bs)
    fpad = lambda x: jnp.pad(x, [(0, 0), (front, 0)] + [(0, 0)] * (x.ndim - 2))  # noqa: E731
    return W, fpad(k), fpad(v), fpad(labels), fpad(blk)


def _heads(x, N, C):
    """``[B, T, K, H]`` -> ``[B, N, T + C, H]``: each query head's kv head, C zero keys appended (a block
    slice starting anywhere below T stays in bounds)."""
    K = x.shape[2]
    x = jnp.repeat(jnp.moveaxis(x, 2, 1), N // K, axis=1)
    return jnp.pad(x, [(0, 0), (0, 0), (0, C), (0, 0)])


def _attend(q, k, v, sel, labels, pos, C, scale, bs):
    B, T, N, H = q.shape
    blk = pos // C
    W, kf, vf, lf, bf = _prepare(k, v, labels, blk, C, bs)
    o_a, lse_a = _band_forward(q, kf, vf, labels, lf, blk, bf, scale, bs, W)
    if sel.shape[-1] == 0:
        return o_a, lse_a, None
    sr = selected_block_rows(sel, labels, pos, C, bs)
    q_g = gather_rows(q, sr.rows)  # [B, N, P, H]
    heads = lambda f, *xs: jax.vmap(jax.vmap(f))(*xs)  # noqa: E731  over (b, n)
    o_g, lse_g = heads(lambda qg, r, lo, hi, kh, vh: _rows_forward(qg, r >= 0, lo, hi, kh, vh, C, scale, bs, T),
                       q_g, sr.rows, sr.tile_lo, sr.tile_hi, _heads(k, N, C), _heads(v, N, C))
    o, lse = merge_parts(o_a, lse_a, o_g, lse_g, sr.rows)
    return o, lse, sr


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def _gathered(q, k, v, sel, labels, pos, chunk: int, scale: float, bs: int):
    return _attend(q, k, v, sel, labels, pos, chunk, scale, bs)[0]


def _gathered_fwd(q, k, v, sel, labels, pos, chunk, scale, bs):
    o, lse, sr = _attend(q, k, v, sel, labels, pos, chunk, scale, bs)
    return o, (q, k, v, o, lse, sr, sel, labels, pos)


def _gathered_bwd(chunk, scale, bs, res, do):
    q, k, v, o, lse, sr, sel, labels, pos = res
    B, T, N, H = q.shape
    C = chunk
    do = do.astype(q.dtype)
    delta = jnp.einsum("BTNH,BTNH->BNT", o, do, precision=jax.lax.Precision.HIGHEST)
    blk = pos // C
    W, kf, vf, lf, bf = _prepare(k, v, labels, blk, C, bs)
    dq, dkf, dvf = _band_backward(q, kf, vf, labels, lf, blk, bf, lse, do, delta, scale, bs, W)
    dk, dv = dkf[:, (W - 1) * bs:], dvf[:, (W - 1) * bs:]  # drop the front padding
    if sr is not None:
        at_rows = lambda y: jnp.take_along_axis(y, jnp.maximum(sr.rows, 0), axis=2)  # noqa: E731  [B, N, T] -> rows
        dq_g, dk_h, dv_h = jax.vmap(jax.vmap(
            lambda qg, r, lo, hi, kh, vh, dog, lg, dg: _rows_backward(qg, r >= 0, lo, hi, kh, vh, dog, lg, dg, C,
                                                                      scale, bs, T)))(
            gather_rows(q, sr.rows), sr.rows, sr.tile_lo, sr.tile_hi, _heads(k, N, C), _heads(v, N, C),
            gather_rows(do, sr.rows), at_rows(lse), at_rows(delta))
        K = k.shape[2]
        from_heads = lambda x: rearrange(x[:, :, :T], "B (K G) T H -> B T K G H", K=K).sum(3)  # noqa: E731
        dq = dq + scatter_rows(dq_g, sr.rows, T)
        dk, dv = dk + from_heads(dk_h), dv + from_heads(dv_h)
    none = (None,) * 3  # integer inputs
    return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)) + none


_gathered.defvjp(_gathered_fwd, _gathered_bwd)


def moba_gathered_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    sel: jax.Array,
    *,
    chunk_size: int,
    segment_ids: Segments | jax.Array | None = None,
    scale: float | None = None,
    block_size: int = 128,
) -> jax.Array:
    """MoBA attention in gathered form, XLA ops; equals the dense-mask reference for the selection ``sel``.

    Args:
      q: ``[B, T, N, H]``; k, v: ``[B, T, K, H]`` (GQA, ``N % K == 0``).
      sel: ``[B, T, N, R]`` int32 selected blocks per token and head (segment-relative block indices; -1, the own
        block, later blocks and repeats add nothing), e.g. from ``moba_select_blocks``.
      chunk_size: MoBA block size C. segment_ids: ``[B, T]`` ids (0 = padding) or a ``Segments``.
      scale: default ``H ** -0.5``. block_size: tile of queries, keys and rows (``min(block_size, C)``).
    Returns:
      ``[B, T, N, H]`` in ``q.dtype``; padding tokens 0. Gradients flow to q, k, v (custom VJP).
    """
    B, T, N, H = q.shape
    K = k.shape[2]
    if N % K:
        raise ValueError(f"query heads {N=} must be a multiple of kv heads {K=}")
    seg = as_segments(segment_ids, B, T)
    scale = H ** -0.5 if scale is None else scale
    bs = max(1, min(block_size, chunk_size, T))
    acc = acc_dtype(q, k, v)  # float32 (float64 under x64 for float64 inputs)
    cast = lambda x: pad_time(x.astype(acc), bs)  # noqa: E731
    out = _gathered(cast(q), cast(k), cast(v), pad_time(sel.astype(jnp.int32), bs, -1), pad_time(seg.labels, bs),
                    pad_time(seg.positions, bs), chunk_size, float(scale), bs)
    return out[:, :T].astype(q.dtype)
