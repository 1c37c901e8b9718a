"""Part B of gathered MoBA (``moba_gathered``: every (token, selected earlier block) pair is a row, rows grouped by
block into row tiles ordered by block start) as TPU-style (Mosaic) kernels: the twins of ``moba_gathered``'s
``moba_rows_*`` GPU-style kernels, for the query heads of one kv head (``moba_gathered`` maps over kv heads).

Key tiles here are ``kb = C`` rounded up to a multiple of the row tile (``key_tile``), so the ``C`` keys ``[lo, hi)``
of a row tile's block lie in at most two consecutive key tiles, ``lo // kb`` and the next. Scalar-prefetched
metadata (SMEM) is linear in the number of row tiles ``nP`` (~``T (k - 1) / block``), never ``(T / block)^2``:

- forward and dQ: grid (batch row, query head g of the group, row tile p, w in {0, 1}); one int32 per row tile,
  ``first key tile * 4 + count`` (count 1 or 2; 0 for an unused tile), picks the key tile the pipeline copies.
  The mask (live row, key in ``[lo, hi)``) comes from per-row ``(token, lo, hi)`` columns in VMEM.
- dK/dV: grid (batch row, entry e) over a work list of (row tile of any query head of the group, key tile) pairs
  sorted by key tile, with one no-op entry per key tile so that every tile's output is written: each output tile
  is visited in one consecutive run (no non-consecutive revisit), accumulated in float32 VMEM scratch, written at
  the run's last entry. ``2 G nP + T / kb`` int32 per batch row, each ``row tile * nK + key tile``.

At T = 131,072, 32 query / 8 kv heads, 128-token tiles: ``C, k = 512, 4`` gives nP = 3,326 row tiles per head,
``4096, 12`` gives 11,296; the largest scalar operand is then 2 * 4 * 11,296 + 32 int32 = 362 KB (dK/dV work
list), under the 1 MiB SMEM of current chips; ``metadata_bytes`` states it for any shape.

Shape letters as ``moba_gathered``; ``G`` query heads per call (one kv head's group), ``kb`` the key tile,
``nK = Tk / kb`` key tiles of the keys padded to ``Tk``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels._flash_common import dot, softmax_finish_refs, softmax_init_refs, softmax_step_refs
from pallas_kernels.platform import check_smem, tpu_params


def key_tile(chunk_size: int, block: int) -> int:
    """The key tile of part B: ``chunk_size`` rounded up to a multiple of ``block``."""
    return -(-chunk_size // block) * block


def metadata_bytes(T: int, heads: int, rows_per_head: int, chunk_size: int, block: int) -> dict[str, int]:
    """Bytes of each scalar-prefetched (SMEM) operand of one call (one batch row, ``heads`` query heads of a kv
    head, ``rows_per_head`` row tiles each, keys padded to whole ``key_tile``): ``{"row_keys", "work_list"}``."""
    kb = key_tile(chunk_size, block)
    nK = -(-T // kb)
    return {"row_keys": 4 * heads * rows_per_head, "work_list": 4 * (2 * heads * rows_per_head + nK)}


# ----------------------------------------------------------------------------------------------- metadata (XLA)

def _row_keys(tile_lo, tile_hi, T, kb):
    """``[B, G, nP]``: ``first key tile * 4 + count`` of each row tile's block (count 0 for an unused tile)."""
    used = tile_lo < T
    first = jnp.where(used, tile_lo // kb, 0)
    count = jnp.where(used, (tile_hi - 1) // kb - first + 1, 0)
    return first * 4 + count


def _row_info(rows, tile_lo, tile_hi, block):
    """``[B, G, P, 3]`` int32 per row: (token, -1 for padding rows; the block's ``lo``; its ``hi``)."""
    per_row = lambda x: jnp.repeat(x, block, axis=-1)  # noqa: E731
    return jnp.stack([rows, per_row(tile_lo), per_row(tile_hi)], axis=-1)


def _work_list(row_keys, nK):
    """``[B, L]`` (``L = 2 G nP + nK``) dK/dV work entries ``row tile * nK + key tile`` sorted by key tile; row
    tile ``G nP`` = no work. Every key tile has at least its no-op entry; unused slots extend the last tile's run."""
    B, G, nP = row_keys.shape
    first, count = row_keys // 4, row_keys % 4
    w = jnp.arange(2, dtype=jnp.int32)
    tiles = first[..., None] + w  # [B, G, nP, 2]
    real = w < count[..., None]
    row_tile = jnp.broadcast_to((jnp.arange(G)[:, None] * nP + jnp.arange(nP)[None, :])[..., None], tiles.shape)
    none = G * nP
    tile = jnp.concatenate([jnp.where(real, tiles, nK).reshape(B, -1),
                            jnp.broadcast_to(jnp.arange(nK, dtype=jnp.int32), (B, nK))], axis=1)
    row = jnp.concatenate([jnp.where(real, row_tile, none).reshape(B, -1), jnp.full((B, nK), none, jnp.int32)],
                          axis=1)
    order = jnp.argsort(tile, axis=1, stable=True)
    tile, row = (jnp.take_along_axis(x, order, axis=1) for x in (tile, row))
    row = jnp.where(tile < nK, row, none)
    return (row * nK + jnp.minimum(tile, nK - 1)).astype(jnp.int32)


# ----------------------------------------------------------------------------------------------- kernels

def _mask(info_ref, key_start, kb):
    """Rows of this tile (``info_ref [block, 3]``) against the keys ``key_start + [0, kb)``."""
    token, lo, hi = (info_ref[:, pl.ds(c, 1)] for c in range(3))  # columns [block, 1]
    k_pos = key_start + jax.lax.broadcasted_iota(jnp.int32, (1, kb), 1)
    return (token >= 0) & (k_pos >= lo) & (k_pos < hi)


def _fwd_kernel(keys_ref, info_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, acc_ref, m_ref, l_ref, *, scale, kb, dims):
    b, g, p, w = (pl.program_id(a) for a in range(4))
    key = keys_ref[_flat(dims, b, g, p)]

    @pl.when(w == 0)
    def _():
        softmax_init_refs(acc_ref, m_ref, l_ref)

    @pl.when(w < jax.lax.rem(key, 4))
    def _():
        mask = _mask(info_ref, (jax.lax.div(key, 4) + w) * kb, kb)
        softmax_step_refs(acc_ref, m_ref, l_ref, q_ref[...], k_ref[...], v_ref[...], mask, scale)

    @pl.when(w == 1)
    def _():
        softmax_finish_refs(acc_ref, m_ref, l_ref, o_ref, lse_ref)  # padding rows: 0 and lse 0


def _dq_kernel(keys_ref, info_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, acc_ref, *, scale, kb,
               dims):
    b, g, p, w = (pl.program_id(a) for a in range(4))
    key = keys_ref[_flat(dims, b, g, p)]

    @pl.when(w == 0)
    def _():
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    @pl.when(w < jax.lax.rem(key, 4))
    def _():
        k = k_ref[...]
        mask = _mask(info_ref, (jax.lax.div(key, 4) + w) * kb, kb)
        pr = jnp.where(mask, jnp.exp(dot(q_ref[...], k, trans_b=True) * scale - lse_ref[...]), 0.0)
        ds = pr * (dot(do_ref[...], v_ref[...], trans_b=True) - delta_ref[...])
        acc_ref[...] += dot(ds.astype(k.dtype), k)

    @pl.when(w == 1)
    def _():
        dq_ref[...] = acc_ref[...] * scale


def _dkv_kernel(work_ref, info_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, dk_acc,
                dv_acc, *, scale, kb, nK, none, length):
    """Entry e of batch row b: row tile ``work // nK`` (``none`` = no work) against key tile ``work % nK``; the
    run of entries of one key tile accumulates its dK/dV."""
    b, e = pl.program_id(0), pl.program_id(1)
    at = lambda i: work_ref[b * length + i]  # noqa: E731
    tile = jax.lax.rem(at(e), nK)
    first = (e == 0) | (jax.lax.rem(at(jnp.maximum(e - 1, 0)), nK) != tile)
    last = (e == length - 1) | (jax.lax.rem(at(jnp.minimum(e + 1, length - 1)), nK) != tile)

    @pl.when(first)
    def _():
        dk_acc[...] = jnp.zeros(dk_acc.shape, jnp.float32)
        dv_acc[...] = jnp.zeros(dv_acc.shape, jnp.float32)

    @pl.when(jax.lax.div(at(e), nK) < none)
    def _():
        q, do = q_ref[...], do_ref[...]
        mask = _mask(info_ref, tile * kb, kb)
        pr = jnp.where(mask, jnp.exp(dot(q, k_ref[...], trans_b=True) * scale - lse_ref[...]), 0.0)  # [rows, kb]
        dv_acc[...] += _dot_tn(pr.astype(do.dtype), do)
        ds = pr * (dot(do, v_ref[...], trans_b=True) - delta_ref[...])
        dk_acc[...] += _dot_tn(ds.astype(q.dtype), q)

    @pl.when(last)
    def _():
        dk_ref[...] = dk_acc[...] * scale
        dv_ref[...] = dv_acc[...]


def _dot_tn(a, b):
    """float32-accumulated ``a.T @ b`` as one transposed-LHS matmul."""
    return jax.lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32,
                               precision=jax.lax.Precision.HIGHEST if a.dtype == jnp.float32 else None)


def _flat(dims, b, g, p):
    G, nP = dims
    return (b * G + g) * nP + p


# ----------------------------------------------------------------------------------------------- pallas calls

def _row_specs(G, nP, H, block, kb, dims):
    """BlockSpecs on the forward / dQ grid (b, g, p, w)."""

    def key_tile_of(b, g, p, w, keys):
        key = keys[_flat(dims, b, g, p)]
        return jax.lax.div(key, 4) + jnp.minimum(w, jnp.maximum(jax.lax.rem(key, 4) - 1, 0))

    own = lambda b, g, p, w, keys: (b, g, p, 0)  # noqa: E731
    return dict(
        rows=pl.BlockSpec((None, None, block, H), own),
        stat=pl.BlockSpec((None, None, block, 1), own),
        info=pl.BlockSpec((None, None, block, 3), own),
        keys=pl.BlockSpec((None, kb, H), lambda b, g, p, w, keys: (b, key_tile_of(b, g, p, w, keys), 0)),
    )


def _work_specs(G, nP, H, block, kb, nK, length):
    """BlockSpecs on the dK/dV grid (b, e): the entry's row tile (clamped for no-op entries) and key tile."""

    def row_tile(b, e, work):
        r = jnp.minimum(jax.lax.div(work[b * length + e], nK), G * nP - 1)
        return b, jax.lax.div(r, nP), jax.lax.rem(r, nP), 0

    return dict(
        rows=pl.BlockSpec((None, None, block, H), row_tile),
        stat=pl.BlockSpec((None, None, block, 1), row_tile),
        info=pl.BlockSpec((None, None, block, 3), row_tile),
        keys=pl.BlockSpec((None, kb, H), lambda b, e, work: (b, jax.lax.rem(work[b * length + e], nK), 0)),
    )


def _prepare(k, v, sr, chunk, block):
    """Keys of the one kv head ``[B, T, 1, H]`` padded to whole key tiles ``[B, Tk, H]``; the row metadata."""
    T = k.shape[1]
    kb = key_tile(chunk, block)
    Tk = -(-T // kb) * kb
    pad = lambda x: jnp.pad(x[:, :, 0], ((0, 0), (0, Tk - T), (0, 0)))  # noqa: E731
    keys = _row_keys(sr.tile_lo, sr.tile_hi, T, kb)
    return pad(k), pad(v), keys, _row_info(sr.rows, sr.tile_lo, sr.tile_hi, block), kb


def _check_metadata(B, G, nP, T, chunk, block, interpret):
    """SMEM (``check_smem``) and int32 range of the work list's ``row tile * nK + key tile``."""
    sizes = metadata_bytes(T, G, nP, chunk, block)
    nK = -(-T // key_tile(chunk, block))
    if (G * nP + 1) * nK >= 2 ** 31:
        raise ValueError(f"the dK/dV work list of {G} heads x {nP} row tiles x {nK} key tiles overflows int32; "
                         f"use a longer tile (block_size)")
    for name, size in sizes.items():
        check_smem(B * size, f"{name} (batch {B}, {G} heads, {nP} row tiles, {nK} key tiles)", interpret)


def rows_forward(q_g, k, v, sr, scale, block, chunk, interpret):
    """Part B forward (TPU style): ``(o [B, G, P, H] float32, lse [B, G, P])`` of every row over its block, for
    rows ``q_g [B, G, P, H]`` of the query heads of one kv head, keys ``k, v [B, T, 1, H]``, ``sr`` the
    ``moba_gathered.SelectedRows`` of those heads."""
    B, G, P, H = q_g.shape
    nP = P // block
    _check_metadata(B, G, nP, k.shape[1], chunk, block, interpret)
    k_, v_, keys, info, kb = _prepare(k, v, sr, chunk, block)
    dims = (G, nP)
    s = _row_specs(G, nP, H, block, kb, dims)
    o, lse = pl.pallas_call(
        functools.partial(_fwd_kernel, scale=scale, kb=kb, dims=dims),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1, grid=(B, G, nP, 2),
            in_specs=[s["info"], s["rows"], s["keys"], s["keys"]],
            out_specs=[s["rows"], s["stat"]],
            scratch_shapes=[pltpu.VMEM((block, H), jnp.float32), pltpu.VMEM((block, 1), jnp.float32),
                            pltpu.VMEM((block, 1), jnp.float32)]),
        out_shape=[jax.ShapeDtypeStruct((B, G, P, H), jnp.float32), jax.ShapeDtypeStruct((B, G, P, 1), jnp.float32)],
        interpret=interpret,
        compiler_params=tpu_params(interpret, ("parallel", "parallel", "parallel", "arbitrary")),
        name="moba_rows_fwd_tpu",
    )(keys.reshape(-1), info, q_g, k_, v_)
    return o, lse[..., 0]


def rows_backward(q_g, k, v, do_g, lse_g, delta_g, sr, scale, block, chunk, interpret):
    """Part B backward (TPU style): ``(dq rows [B, G, P, H], dk, dv [B, T, 1, H])`` float32; ``lse_g``,
    ``delta_g [B, G, P]`` the merged statistics at the rows."""
    B, G, P, H = q_g.shape
    T = k.shape[1]
    nP = P // block
    _check_metadata(B, G, nP, T, chunk, block, interpret)
    k_, v_, keys, info, kb = _prepare(k, v, sr, chunk, block)
    nK = k_.shape[1] // kb
    dims = (G, nP)
    s = _row_specs(G, nP, H, block, kb, dims)
    lse_c, delta_c = lse_g[..., None], delta_g[..., None]
    dq_g = pl.pallas_call(
        functools.partial(_dq_kernel, scale=scale, kb=kb, dims=dims),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1, grid=(B, G, nP, 2),
            in_specs=[s["info"], s["rows"], s["keys"], s["keys"], s["rows"], s["stat"], s["stat"]],
            out_specs=s["rows"],
            scratch_shapes=[pltpu.VMEM((block, H), jnp.float32)]),
        out_shape=jax.ShapeDtypeStruct((B, G, P, H), jnp.float32),
        interpret=interpret,
        compiler_params=tpu_params(interpret, ("parallel", "parallel", "parallel", "arbitrary")),
        name="moba_rows_dq_tpu",
    )(keys.reshape(-1), info, q_g, k_, v_, do_g, lse_c, delta_c)
    work = _work_list(keys, nK)
    length = work.shape[1]
    sw = _work_specs(G, nP, H, block, kb, nK, length)
    kv_shape = jax.ShapeDtypeStruct(k_.shape, jnp.float32)
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, scale=scale, kb=kb, nK=nK, none=G * nP, length=length),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1, grid=(B, length),
            in_specs=[sw["info"], sw["rows"], sw["keys"], sw["keys"], sw["rows"], sw["stat"], sw["stat"]],
            out_specs=[sw["keys"], sw["keys"]],
            scratch_shapes=[pltpu.VMEM((kb, H), jnp.float32), pltpu.VMEM((kb, H), jnp.float32)]),
        out_shape=[kv_shape, kv_shape],
        interpret=interpret,
        compiler_params=tpu_params(interpret, ("parallel", "arbitrary")),
        name="moba_rows_dkv_tpu",
    )(work.reshape(-1), info, q_g, k_, v_, do_g, lse_c, delta_c)
    return dq_g, dk[:, :T, None], dv[:, :T, None]
