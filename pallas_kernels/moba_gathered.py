"""MoBA attention in gathered form: the work is the selected (query, key) pairs, whatever the selection.

The query-major kernel (``moba_flash_attention(..., algorithm="union")``) visits, per query tile, the union of the
key tiles its tokens selected. When the tokens of a tile select different blocks — random inputs almost always
do — that union is every earlier tile, and the kernel does dense causal work. Here each token's attention is split
in two parts whose softmax statistics are merged per token:

A. **Own block** (causal inside the block): the block-sparse core of ``block_sparse_flash`` with a narrow band of
   key tiles per query tile (``own_block_lists``: at most ``ceil((C - 1) / block) + 1`` tiles, built in O(T)).
B. **Selected earlier blocks**: every (token, selected block) pair is a *row*. Rows are grouped by block, each
   group padded to whole tiles of ``block`` rows and ordered by block start (``selected_block_rows``); the
   queries are gathered into that order, and one program per row tile attends to the ``C`` keys of its block.
   All of them are visible (a selected block is complete and strictly earlier, in the token's segment), so the
   only masking is of padding rows and of the key tiles' overhang past the block.

Work: ``T * (k - 1) * C`` pairs per head for part B plus at most ``block - 1`` padding rows per block, and part A's
band. Memory: ``T (k - 1)`` gathered rows per head (queries; float32 partial outputs; in the backward dO and
float32 dQ rows) — linear in T; part B runs one kv head (its GQA group of query heads) at a time
(``lax.map``), so at most ``(k - 1) / K`` times the size of ``q`` (float32: twice that) is live at once.

Backward: the merged output and log-sum-exp give every (query, key) pair its probability, so each part computes
its gradient contributions independently: part A with the core's dQ / dK / dV kernels, part B with a dQ kernel
per row tile (rows scattered back to their tokens) and a dK / dV kernel per (kv head, key tile) that walks the
row tiles whose block overlaps that key tile — a contiguous range, since row tiles are ordered by block start —
for each query head of the GQA group in turn (the group's sum stays on chip).

Both targets: ``target="triton"`` runs the GPU-style kernels of this module; ``target="mosaic_tpu"`` runs part A
on ``block_sparse_flash_tpu`` (own-block lists shared by all heads) and part B on ``moba_gathered_tpu`` (row
tiles as a grid dimension, scalar-prefetched metadata linear in T).

Shape letters: see ``spb2_jax.parallel.rules`` and ``block_sparse_flash``; here ``P`` is the number of part-B rows
per (batch row, head), ``nP = P / block`` row tiles (not the SSE partitions of the package vocabulary).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels._flash_common import dkv_step, dq_step, row_delta, softmax_finish, softmax_init, softmax_step
from pallas_kernels.block_sparse_flash import MaskSpec, backward, forward, lists_from_need
from pallas_kernels import moba_gathered_tpu
from pallas_kernels.platform import triton_params


# ----------------------------------------------------------------------------------------------- metadata (XLA)

def own_block_lists(seg: jax.Array, pos: jax.Array, chunk_size: int, block: int, heads: int):
    """Tile lists of part A (own block, causal) for the block-sparse core, built in O(T): ``(fwd_lists,
    fwd_count, bwd_lists, bwd_count)`` of shapes ``[B, heads, nT, W]`` / ``[B, heads, nT]``.

    Token t at position ``pos`` of its segment needs keys ``[t - pos % C, t]``, so query tile i needs the
    contiguous key tiles from ``first_i`` (the lowest own-block start among its tokens, in tiles) to i, never more
    than ``W = ceil((C - 1) / block) + 1``; key tile j is needed by the query tiles i in ``[j, j + W)`` with
    ``first_i <= j``. Padding tokens (``seg == 0``) need nothing (start = t). A segment whose positions do not
    start at 0 has a partial first block: starts are clamped to the segment's first token."""
    B, T = seg.shape
    nT = T // block
    t = jnp.arange(T, dtype=jnp.int32)
    start = jnp.where(seg != 0, jnp.maximum(t - pos % chunk_size, segment_start(seg)), t)
    first = start.reshape(B, nT, block).min(-1) // block  # [B, nT]
    W = min(nT, -(-(chunk_size - 1) // block) + 1)
    i = jnp.arange(nT, dtype=jnp.int32)
    fwd = jnp.minimum(first[..., None] + jnp.arange(W, dtype=jnp.int32), i[:, None])  # past the count: i again
    fwd_n = i - first + 1
    cand = i[:, None] + jnp.arange(W, dtype=jnp.int32)  # [nT, W] query tiles that may need key tile j = row
    need = (cand < nT) & (jnp.take(first, jnp.minimum(cand, nT - 1), axis=1) <= i[:, None])  # [B, nT, W]
    order, bwd_n = lists_from_need(need)
    bwd = jnp.minimum(i[:, None] + order, nT - 1)
    heads_of = lambda x: jnp.broadcast_to(x[:, None], (B, heads) + x.shape[1:])  # noqa: E731
    return heads_of(fwd), heads_of(fwd_n), heads_of(bwd), heads_of(bwd_n)


def segment_start(seg: jax.Array) -> jax.Array:
    """``[B, T]`` index of the first token of every token's run of equal labels."""
    B, T = seg.shape
    t = jnp.arange(T, dtype=jnp.int32)
    new = jnp.concatenate([jnp.ones((B, 1), bool), seg[:, 1:] != seg[:, :-1]], axis=1)
    return jax.lax.cummax(jnp.where(new, t, 0), axis=1)


class SelectedRows(NamedTuple):
    """Part B's rows (see the module docstring), per batch row b and query head n.

    rows: ``[B, N, P]`` int32 token of each row, -1 = padding row.
    tile_lo, tile_hi: ``[B, N, nP]`` int32 the keys ``[lo, hi)`` of the block of each row tile (``C`` keys, fewer
      for the first block of a segment whose positions start past 0; ``lo = T`` for an unused tile).
    kv_first, kv_count: ``[B, N, nT]`` int32 the row tiles whose block overlaps key tile j:
      ``kv_first[j] .. kv_first[j] + kv_count[j] - 1``.
    """

    rows: jax.Array
    tile_lo: jax.Array
    tile_hi: jax.Array
    kv_first: jax.Array
    kv_count: jax.Array


def row_capacity(T: int, R: int, chunk_size: int, block: int) -> int:
    """Number of row tiles ``nP`` that always suffices: at most ``T min(R, ceil((T - 1) / C))`` pairs (a token's
    valid blocks are distinct and start in ``[segment start, own block start)``, a range of at most ``T - 1``
    tokens, one start per ``C`` of it), and at most ``T // C`` distinct selectable blocks (complete, disjoint)
    each padding its group by at most ``block - 1`` rows."""
    pairs = T * min(R, -(-(T - 1) // chunk_size))
    return max(1, -(-(pairs + (T // chunk_size) * (block - 1)) // block))


def _valid_selection(sel, own):
    """``sel [..., R] >= 0`` naming a strictly earlier block (own block index ``own [...]``), each block once."""
    ok = (sel >= 0) & (sel < own[..., None])
    cols = [ok[..., 0]] if sel.shape[-1] else []
    for r in range(1, sel.shape[-1]):
        repeat = jnp.any(sel[..., :r] == sel[..., r:r + 1], axis=-1)
        cols.append(ok[..., r] & ~repeat)
    return jnp.stack(cols, axis=-1) if cols else ok


def selected_block_rows(sel: jax.Array, seg: jax.Array, pos: jax.Array, chunk_size: int, block: int
                        ) -> SelectedRows:
    """Part B's rows from ``sel [B, T, N, R]`` (segment-relative block indices; -1, the own block, later blocks
    and repeats are ignored), ``seg``/``pos [B, T]``; ``T`` a multiple of ``block``. O(T R log(T R)) (one sort)."""
    B, T, N, R = sel.shape
    C = chunk_size
    nP = row_capacity(T, R, C, block)
    P, nT = nP * block, T // block
    t = jnp.arange(T, dtype=jnp.int32)
    s = jnp.moveaxis(sel.astype(jnp.int32), 2, 1)  # [B, N, T, R]
    nominal = (t - pos)[:, None, :, None] + s * C  # where block s would start if positions began at 0
    first = segment_start(seg)[:, None, :, None]
    lo, hi = jnp.maximum(nominal, first), nominal + C  # the block's keys [lo, hi) inside the segment
    ok = _valid_selection(s, jnp.broadcast_to((pos // C)[:, None], (B, N, T))) & (seg != 0)[:, None, :, None]
    ok = ok & (hi > lo)
    key = jnp.where(ok, lo, T).reshape(B, N, T * R)  # T = no block (sorts last)
    hi = jnp.where(ok, hi, 0).reshape(B, N, T * R)

    def one(key, hi):  # [T R] -> this (b, n)'s rows
        order = jnp.argsort(key, stable=True).astype(jnp.int32)
        skey = key[order]
        count = jnp.bincount(key, length=T + 1)[:T]  # rows per block start
        tiles = -(-count // block)
        tile_off = jnp.cumsum(tiles) - tiles
        row_off = jnp.cumsum(count) - count
        g = jnp.minimum(skey, T - 1)
        dest = jnp.where(skey < T, tile_off[g] * block + jnp.arange(T * R, dtype=jnp.int32) - row_off[g], P)
        rows = jnp.full((P,), -1, jnp.int32).at[dest].set(order // R, mode="drop")
        marks = jnp.full((nP,), -1, jnp.int32).at[jnp.where(tiles > 0, tile_off, nP)].max(t, mode="drop")
        used = jnp.arange(nP) < tiles.sum()
        tile_lo = jnp.where(used, jax.lax.cummax(marks), T)
        hi_of = jnp.zeros((T + 1,), jnp.int32).at[key].max(hi)  # one block per start: its end
        tile_hi = jnp.where(used, hi_of[jnp.minimum(tile_lo, T)], 0)
        first_kt = tile_lo // block  # nT for unused tiles
        last_kt = jnp.where(used, (tile_hi - 1) // block, nT)
        j = jnp.arange(nT, dtype=jnp.int32)
        kv_first = jnp.searchsorted(last_kt, j, side="left").astype(jnp.int32)
        kv_end = jnp.searchsorted(first_kt, j, side="right").astype(jnp.int32)
        return rows, tile_lo, tile_hi, kv_first, jnp.maximum(kv_end - kv_first, 0)

    return SelectedRows(*jax.vmap(jax.vmap(one))(key, hi))


def gather_rows(x: jax.Array, rows: jax.Array) -> jax.Array:
    """``x [B, T, N, ...]`` -> ``[B, N, P, ...]`` at the rows' tokens (padding rows read token 0)."""
    xt = jnp.moveaxis(x, 2, 1)
    idx = jnp.maximum(rows, 0).reshape(rows.shape + (1,) * (xt.ndim - 3))
    return jnp.take_along_axis(xt, idx, axis=2)


def _segment(fn, data, rows, T):
    """Per (b, n): ``fn(data[rows == t])`` for every token t (``jax.ops.segment_*``; padding rows dropped)."""
    ids = jnp.where(rows < 0, T, rows)
    return jax.vmap(jax.vmap(lambda d, i: fn(d, i, num_segments=T + 1)[:T]))(data, ids)


def scatter_rows(y: jax.Array, rows: jax.Array, T: int) -> jax.Array:
    """Sum of the rows ``y [B, N, P, H]`` per token: ``[B, T, N, H]``."""
    return jnp.moveaxis(_segment(jax.ops.segment_sum, y, rows, T), 1, 2)


# ----------------------------------------------------------------------------------------------- kernels

def _block_mask(live, lo, hi, k_pos):
    """Rows ``live [t]`` against keys ``k_pos [s]`` of the block ``[lo, hi)``."""
    return live[:, None] & ((k_pos >= lo) & (k_pos < hi))[None, :]


def _key_tiles(lo, hi, block, seq_len):
    """First key tile of the block ``[lo, hi)`` and how many tiles it spans (0 for an unused row tile)."""
    first = lo // block
    return first, jnp.where(lo < seq_len, (hi - 1) // block - first + 1, 0)


def _rows_fwd_kernel(span_ref, rows_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *, scale, block, seq_len):
    lo, hi = span_ref[0], span_ref[1]
    q, live = q_ref[...], rows_ref[...] >= 0
    first, count = _key_tiles(lo, hi, block, seq_len)

    def visit(c, carry):
        j = first + c
        sl = pl.ds(pl.multiple_of(j * block, block), block)
        mask = _block_mask(live, lo, hi, j * block + jnp.arange(block, dtype=jnp.int32))
        return softmax_step(carry, q, k_ref[sl, :], v_ref[sl, :], mask, scale)

    o, lse = softmax_finish(*jax.lax.fori_loop(0, count, visit, softmax_init(block, q.shape[-1])))
    o_ref[...] = o
    lse_ref[...] = lse


def _rows_dq_kernel(span_ref, rows_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, *, scale, block,
                    seq_len):
    lo, hi = span_ref[0], span_ref[1]
    q, do, live = q_ref[...], do_ref[...], rows_ref[...] >= 0
    lse, delta = lse_ref[...], delta_ref[...]
    first, count = _key_tiles(lo, hi, block, seq_len)

    def visit(c, dq):
        j = first + c
        sl = pl.ds(pl.multiple_of(j * block, block), block)
        mask = _block_mask(live, lo, hi, j * block + jnp.arange(block, dtype=jnp.int32))
        return dq_step(dq, q, k_ref[sl, :], v_ref[sl, :], do, lse, delta, mask, scale)

    dq_ref[...] = jax.lax.fori_loop(0, count, visit, jnp.zeros(q.shape, jnp.float32)) * scale


def _rows_dkv_kernel(first_ref, count_ref, lo_ref, hi_ref, rows_ref, q_ref, k_ref, v_ref, do_ref, lse_ref,
                     delta_ref, dk_ref, dv_ref, *, scale, block):
    """One (row, kv head, key tile) program: for each query head of the GQA group, the row tiles whose block
    overlaps this key tile; the group's dK/dV accumulate in registers."""
    j = pl.program_id(2)
    k, v = k_ref[...], v_ref[...]
    k_pos = j * block + jnp.arange(block, dtype=jnp.int32)
    dk = dv = jnp.zeros(k.shape, jnp.float32)
    for g in range(first_ref.shape[0]):  # static: the group's query heads

        def visit(c, carry, g=g):
            p = first_ref[g, 0] + c
            sl = pl.ds(pl.multiple_of(p * block, block), block)
            mask = _block_mask(rows_ref[g, sl] >= 0, lo_ref[g, p], hi_ref[g, p], k_pos)
            return dkv_step(carry, q_ref[g, sl, :], k, v, do_ref[g, sl, :], lse_ref[g, sl], delta_ref[g, sl], mask,
                            scale)

        dk, dv = jax.lax.fori_loop(0, count_ref[g, 0], visit, (dk, dv))
    dk_ref[...] = dk * scale
    dv_ref[...] = dv


def _row_specs(N, K, T, P, H, block):
    """BlockSpecs of the row-tile grid (b, query head n, row tile p)."""
    G = N // K
    return dict(
        span=pl.BlockSpec((None, None, None, 2), lambda b, n, p: (b, n, p, 0)),
        rows=pl.BlockSpec((None, None, block), lambda b, n, p: (b, n, p)),
        tile=pl.BlockSpec((None, None, block, H), lambda b, n, p: (b, n, p, 0)),
        kv_whole=pl.BlockSpec((None, T, None, H), lambda b, n, p: (b, 0, jax.lax.div(n, G), 0)),
    )


def _spans(sr):
    """``[B, N, nP, 2]``: each row tile's block ``[lo, hi)``."""
    return jnp.stack([sr.tile_lo, sr.tile_hi], axis=-1)


def _rows_forward(q_g, k, v, sr, scale, block, interpret):
    """Part B forward: ``(o [B, N, P, H] float32, lse [B, N, P])`` of every row over its block."""
    B, N, P, H = q_g.shape
    T = k.shape[1]
    s = _row_specs(N, k.shape[2], T, P, H, block)
    return pl.pallas_call(
        functools.partial(_rows_fwd_kernel, scale=scale, block=block, seq_len=T),
        grid=(B, N, P // block),
        in_specs=[s["span"], s["rows"], s["tile"], s["kv_whole"], s["kv_whole"]],
        out_specs=[s["tile"], s["rows"]],
        out_shape=[jax.ShapeDtypeStruct((B, N, P, H), jnp.float32), jax.ShapeDtypeStruct((B, N, P), jnp.float32)],
        interpret=interpret,
        compiler_params=triton_params(interpret),
        name="moba_rows_fwd",
    )(_spans(sr), sr.rows, q_g, k, v)


def _rows_backward(q_g, k, v, do_g, lse_g, delta_g, sr, scale, block, interpret):
    """Part B backward: ``(dq rows [B, N, P, H], dk, dv [B, T, K, H])``, float32."""
    B, N, P, H = q_g.shape
    T, K = k.shape[1], k.shape[2]
    G, nP = N // K, P // block
    s = _row_specs(N, K, T, P, H, block)
    dq_g = pl.pallas_call(
        functools.partial(_rows_dq_kernel, scale=scale, block=block, seq_len=T),
        grid=(B, N, nP),
        in_specs=[s["span"], s["rows"], s["tile"], s["kv_whole"], s["kv_whole"], s["tile"], s["rows"], s["rows"]],
        out_specs=s["tile"],
        out_shape=jax.ShapeDtypeStruct((B, N, P, H), jnp.float32),
        interpret=interpret,
        compiler_params=triton_params(interpret),
        name="moba_rows_dq",
    )(_spans(sr), sr.rows, q_g, k, v, do_g, lse_g, delta_g)
    group = lambda *shape: pl.BlockSpec((None, G) + shape, lambda b, kv, j: (b, kv) + (0,) * len(shape))  # noqa
    key_tile = pl.BlockSpec((None, None, G, None, 1), lambda b, kv, j: (b, kv, 0, j, 0))
    kv_tile = pl.BlockSpec((None, block, None, H), lambda b, kv, j: (b, j, kv, 0))
    grouped = lambda x: x.reshape((B, K, G) + x.shape[2:])  # noqa: E731  [B, N, ...] -> [B, K, G, ...]
    kv_shape = jax.ShapeDtypeStruct(k.shape, jnp.float32)
    dk, dv = pl.pallas_call(
        functools.partial(_rows_dkv_kernel, scale=scale, block=block),
        grid=(B, K, T // block),
        in_specs=[key_tile, key_tile, group(nP), group(nP), group(P), group(P, H), kv_tile, kv_tile, group(P, H),
                  group(P), group(P)],
        out_specs=[kv_tile, kv_tile],
        out_shape=[kv_shape, kv_shape],
        interpret=interpret,
        compiler_params=triton_params(interpret),
        name="moba_rows_dkv",
    )(grouped(sr.kv_first[..., None]), grouped(sr.kv_count[..., None]), sr.tile_lo, sr.tile_hi, sr.rows, q_g, k, v,
      do_g, lse_g, delta_g)
    return dq_g, dk, dv


# ----------------------------------------------------------------------------------------------- attention

def merge_parts(o_a, lse_a, o_g, lse_g, rows):
    """Per token, the softmax over both parts: ``(o [B, T, N, H] float32, lse [B, N, T])`` from part A's ``o_a
    [B, T, N, H]``, ``lse_a [B, N, T]`` and part B's rows (padding tokens: part A's 0 and 0)."""
    T = o_a.shape[1]
    m = jnp.maximum(lse_a, _segment(jax.ops.segment_max, lse_g, rows, T))
    m_rows = jnp.take_along_axis(m, jnp.maximum(rows, 0), axis=2)
    total = jnp.exp(lse_a - m) + _segment(jax.ops.segment_sum, jnp.exp(lse_g - m_rows), rows, T)
    lse = m + jnp.log(total)
    w_rows = jnp.exp(lse_g - jnp.take_along_axis(lse, jnp.maximum(rows, 0), axis=2))
    o = jnp.exp(lse_a - lse).transpose(0, 2, 1)[..., None] * o_a + scatter_rows(w_rows[..., None] * o_g, rows, T)
    return o, lse


def _own_meta(seg, pos, chunk, block, heads, target):
    """Part A's metadata for the block-sparse core; the TPU kernels take lists shared by all heads (one copy in
    SMEM: ``nT W`` int32 per batch row)."""
    B, T = seg.shape
    none = jnp.full((B, T, heads, 1), -1, jnp.int32)  # no selected blocks: the MoBA mask is the own block alone
    lists = own_block_lists(seg, pos, chunk, block, 1 if target == "mosaic_tpu" else heads)
    return lists + (seg, pos // chunk, none)


def _by_kv_head(x, K):
    """``[B, T, N, ...]`` -> ``[K, B, T, N // K, ...]`` (query heads grouped by their kv head, GQA)."""
    B, T, N = x.shape[:3]
    return jnp.moveaxis(x.reshape((B, T, K, N // K) + x.shape[3:]), 2, 0)


def _stats_by_kv_head(x, K):
    """Per-token statistics ``[B, N, T]`` -> ``[K, B, N // K, T]``."""
    B, N, T = x.shape
    return jnp.moveaxis(x.reshape(B, K, N // K, T), 1, 0)


def _from_kv_heads(x):
    """Inverse of ``_by_kv_head``."""
    K, B, T, G = x.shape[:4]
    return jnp.moveaxis(x, 0, 2).reshape((B, T, K * G) + x.shape[4:])


def _part_b_forward(q_g, k, v, sr, scale, block, chunk, interpret, target):
    if target == "mosaic_tpu":
        return moba_gathered_tpu.rows_forward(q_g, k, v, sr, scale, block, chunk, interpret)
    return _rows_forward(q_g, k, v, sr, scale, block, interpret)


def _part_b_backward(q_g, k, v, do_g, lse_g, delta_g, sr, scale, block, chunk, interpret, target):
    if target == "mosaic_tpu":
        return moba_gathered_tpu.rows_backward(q_g, k, v, do_g, lse_g, delta_g, sr, scale, block, chunk, interpret)
    return _rows_backward(q_g, k, v, do_g, lse_g, delta_g, sr, scale, block, interpret)


def _attend(q, k, v, sel, seg, pos, chunk, scale, block, interpret, target):
    B, T, N, H = q.shape
    K = k.shape[2]
    meta = _own_meta(seg, pos, chunk, block, N, target)
    o_a, lse_a = forward(q, k, v, meta, MaskSpec(moba=True), scale, block, interpret=interpret, target=target,
                         out_dtype=jnp.float32)
    if sel.shape[-1] == 0:  # topk 1: the own block alone
        return o_a.astype(q.dtype), lse_a, meta, None

    def one_kv_head(x):  # part B and the merge for the query heads of one kv head: memory / K
        q_h, k_h, v_h, sel_h, o_h, lse_h = x
        sr = selected_block_rows(sel_h, seg, pos, chunk, block)
        o_g, lse_g = _part_b_forward(gather_rows(q_h, sr.rows), k_h, v_h, sr, scale, block, chunk, interpret,
                                     target)
        return merge_parts(o_h, lse_h, o_g, lse_g, sr.rows) + (sr,)

    o, lse, sr = jax.lax.map(one_kv_head, (_by_kv_head(q, K), _by_kv_head(k, K), _by_kv_head(v, K),
                                           _by_kv_head(sel, K), _by_kv_head(o_a, K), _stats_by_kv_head(lse_a, K)))
    return _from_kv_heads(o).astype(q.dtype), jnp.moveaxis(lse, 0, 1).reshape(B, N, T), meta, sr


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9, 10))
def moba_gathered_attention(q, k, v, sel, seg, pos, chunk: int, scale: float, block: int, interpret: bool,
                            target: str = "triton"):
    """MoBA attention (own block causal + selected earlier blocks, per token and head) in gathered form.

    Args:
      q: ``[B, T, N, H]``; k, v: ``[B, T, K, H]``; ``T`` a multiple of ``block`` (pad with segment 0).
      sel: ``[B, T, N, R]`` int32 selected blocks (segment-relative; -1, the own block, later blocks and repeats
        add nothing). seg: ``[B, T]`` segment labels (0 = padding). pos: ``[B, T]`` position in the segment.
      chunk: MoBA block size C. scale: logit scale. block: tile of queries, keys and rows (a power of two).
      interpret: run the kernels in interpret mode (CPU; or a ``pltpu.InterpretParams``).
      target: ``"triton"`` (GPU-style kernels) or ``"mosaic_tpu"`` (part A by ``block_sparse_flash_tpu``, part B
        by ``moba_gathered_tpu``).
    Returns:
      ``[B, T, N, H]`` in ``q.dtype`` (padding rows 0).
    """
    return _attend(q, k, v, sel, seg, pos, chunk, scale, block, interpret, target)[0]


def _vjp_fwd(q, k, v, sel, seg, pos, chunk, scale, block, interpret, target):
    o, lse, meta, sr = _attend(q, k, v, sel, seg, pos, chunk, scale, block, interpret, target)
    return o, (q, k, v, o, lse, meta, sr, sel, seg, pos)


def _vjp_bwd(chunk, scale, block, interpret, target, res, do):
    q, k, v, o, lse, meta, sr, sel, seg, pos = res
    dq, dk, dv = backward(q, k, v, o, lse, do, meta, MaskSpec(moba=True), scale, block, interpret=interpret,
                          target=target, grad_dtype=jnp.float32)
    none = lambda x: None  # noqa: E731  integer inputs: no cotangent
    ints = tuple(none(x) for x in (sel, seg, pos))
    if sr is None:
        return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)) + ints
    T, K = q.shape[1], k.shape[2]
    delta = row_delta(o, do)

    def one_kv_head(x):
        q_h, k_h, v_h, do_h, lse_h, delta_h, sr_h = x
        at_rows = lambda y: jnp.take_along_axis(y, jnp.maximum(sr_h.rows, 0), axis=2)  # noqa: E731
        dq_g, dk_h, dv_h = _part_b_backward(gather_rows(q_h, sr_h.rows), k_h, v_h, gather_rows(do_h, sr_h.rows),
                                            at_rows(lse_h), at_rows(delta_h), sr_h, scale, block, chunk, interpret,
                                            target)
        return scatter_rows(dq_g, sr_h.rows, T), dk_h, dv_h

    dq_b, dk_b, dv_b = jax.lax.map(one_kv_head, (_by_kv_head(q, K), _by_kv_head(k, K), _by_kv_head(v, K),
                                                 _by_kv_head(do, K), _stats_by_kv_head(lse, K),
                                                 _stats_by_kv_head(delta, K), sr))
    dq, dk, dv = dq + _from_kv_heads(dq_b), dk + _from_kv_heads(dk_b), dv + _from_kv_heads(dv_b)
    return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)) + ints


moba_gathered_attention.defvjp(_vjp_fwd, _vjp_bwd)
