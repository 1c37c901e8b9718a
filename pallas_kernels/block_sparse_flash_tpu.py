"""Block-sparse flash attention, TPU style (Mosaic TPU): the TPU twins of the three kernels of
``block_sparse_flash`` (same ``meta``, same mask from ``_flash_common``, same results). ``block_sparse_flash``'s
``forward`` / ``backward`` / ``block_sparse_attention`` run these with ``target="mosaic_tpu"``.

The grid is (batch row, query head, own tile, list entry) — for dK/dV (batch row, kv head, own key tile, entry
over the lists of the GQA group's query heads in turn). The tile lists and their counts are scalar-prefetched
into SMEM, and the BlockSpec index maps read them, so the pipeline copies exactly the listed K/V tiles (forward,
dQ) or Q/dO tiles (dK/dV) into VMEM, one per step; steps past a tile's count re-use the last listed index (no
copy) and skip the compute. Online-softmax statistics and gradient accumulators live in float32 VMEM scratch
across the last ("arbitrary") grid dimension and are written out at its last step.

Layout for Mosaic's (8, 128) tiling: heads before time (``[B, N, T, H]``), per-token metadata of the query side
as columns ``[B, T, 1]`` and of the key side as rows ``[B, 1, T]``, statistics as ``[B, N, T, 1]``; a tile must
be a multiple of 128 tokens or the whole (padded) sequence. dK/dV use transposed-LHS matmuls (no explicit
transpose). SMEM holds the whole lists, flattened: ``B N nT M`` int32, or ``B nT M`` when the lists have one head
(shared by all heads, as gathered MoBA's own-block band). Union MoBA lists can be ``nT`` long: at 32k tokens and
32 heads with 128-token tiles that is 8 MiB, past the 1 MiB of current chips; the wrapper raises a ValueError with
the sizes (``platform.check_smem``) — the gathered MoBA (``moba_gathered``) is linear in T instead.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels._flash_common import (check_whole_tiles, dot, row_delta, softmax_finish_refs, softmax_init_refs,
                                           softmax_step_refs, token_mask)
from pallas_kernels.platform import check_smem, tpu_params

_SEMANTICS = ("parallel", "parallel", "parallel", "arbitrary")


def _tile_mask(spec, q_tile, k_tile, block, qseg_ref, kseg_ref, qblk_ref, kblk_ref, sel_ref):
    """Mask of query tile ``q_tile`` against key tile ``k_tile`` from the column (query) / row (key) metadata."""
    row = jax.lax.broadcasted_iota(jnp.int32, (block, block), 0)
    col = jax.lax.broadcasted_iota(jnp.int32, (block, block), 1)
    rel = (q_tile - k_tile) * block + row - col
    cols = [sel_ref[:, pl.ds(r, 1)] for r in range(sel_ref.shape[-1])]
    return token_mask(spec, rel, qseg_ref[...], kseg_ref[...], qblk_ref[...], kblk_ref[...], cols)


def _fwd_kernel(lists_ref, count_ref, q_ref, k_ref, v_ref, qseg_ref, kseg_ref, qblk_ref, kblk_ref, sel_ref,
                o_ref, lse_ref, acc_ref, m_ref, l_ref, *, spec, scale, block, dims):
    b, n, i, c = (pl.program_id(a) for a in range(4))

    @pl.when(c == 0)
    def _():
        softmax_init_refs(acc_ref, m_ref, l_ref)

    @pl.when(c < _count_at(count_ref, dims, b, n, i))
    def _():
        mask = _tile_mask(spec, i, _list_at(lists_ref, dims, b, n, i, c), block, qseg_ref, kseg_ref, qblk_ref,
                          kblk_ref, sel_ref)
        softmax_step_refs(acc_ref, m_ref, l_ref, q_ref[...], k_ref[...], v_ref[...], mask, scale)

    @pl.when(c == pl.num_programs(3) - 1)
    def _():
        softmax_finish_refs(acc_ref, m_ref, l_ref, o_ref, lse_ref)  # padding / no visible key: 0 and lse 0


def _dq_kernel(lists_ref, count_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qseg_ref, kseg_ref,
               qblk_ref, kblk_ref, sel_ref, dq_ref, acc_ref, *, spec, scale, block, dims):
    b, n, i, c = (pl.program_id(a) for a in range(4))

    @pl.when(c == 0)
    def _():
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    @pl.when(c < _count_at(count_ref, dims, b, n, i))
    def _():
        k = k_ref[...]
        mask = _tile_mask(spec, i, _list_at(lists_ref, dims, b, n, i, c), block, qseg_ref, kseg_ref, qblk_ref,
                          kblk_ref, sel_ref)
        p = jnp.where(mask, jnp.exp(dot(q_ref[...], k, trans_b=True) * scale - lse_ref[...]), 0.0)
        ds = p * (dot(do_ref[...], v_ref[...], trans_b=True) - delta_ref[...])
        acc_ref[...] += dot(ds.astype(k.dtype), k)

    @pl.when(c == pl.num_programs(3) - 1)
    def _():
        dq_ref[...] = (acc_ref[...] * scale).astype(dq_ref.dtype)


def _dkv_kernel(lists_ref, count_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qseg_ref, kseg_ref,
                qblk_ref, kblk_ref, sel_ref, dk_ref, dv_ref, dk_acc, dv_acc, *, spec, scale, block, group, dims):
    """Grid (b, kv head, key tile j, e): entry ``e`` walks query head ``kv * group + e // width`` of the GQA group,
    list entry ``e % width``; the group's dK/dV accumulate in VMEM (no per-query-head copies)."""
    b, kv, j, e = (pl.program_id(a) for a in range(4))
    width = dims[2]
    n, c = kv * group + jax.lax.div(e, width), jax.lax.rem(e, width)

    @pl.when(e == 0)
    def _():
        dk_acc[...] = jnp.zeros(dk_acc.shape, jnp.float32)
        dv_acc[...] = jnp.zeros(dv_acc.shape, jnp.float32)

    @pl.when(c < _count_at(count_ref, dims, b, n, j))
    def _():
        q, do = q_ref[...], do_ref[...]
        mask = _tile_mask(spec, _list_at(lists_ref, dims, b, n, j, c), j, block, qseg_ref, kseg_ref, qblk_ref,
                          kblk_ref, sel_ref)
        p = jnp.where(mask, jnp.exp(dot(q, k_ref[...], trans_b=True) * scale - lse_ref[...]), 0.0)  # [t, s]
        dv_acc[...] += _dot_tn(p.astype(do.dtype), do)
        ds = p * (dot(do, v_ref[...], trans_b=True) - delta_ref[...])
        dk_acc[...] += _dot_tn(ds.astype(q.dtype), q)

    @pl.when(e == pl.num_programs(3) - 1)
    def _():
        dk_ref[...] = (dk_acc[...] * scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_acc[...].astype(dv_ref.dtype)


# ----------------------------------------------------------------------------------------------- pallas calls

def _dot_tn(a, b):
    """float32-accumulated ``a.T @ b`` as one transposed-LHS matmul (no explicit transpose of ``a``)."""
    return jax.lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32,
                               precision=jax.lax.Precision.HIGHEST if a.dtype == jnp.float32 else None)


def _count_at(counts, dims, b, n, i):
    """``counts[b, n, i]`` of the flattened counts (``dims`` = (heads, tiles, list width); lists with one head
    are shared by all heads)."""
    N, nT, _ = dims
    return counts[(b * N + (n if N > 1 else 0)) * nT + i]


def _list_at(lists, dims, b, n, i, c):
    """``lists[b, n, i, c]`` of the flattened lists (one head: shared by all heads)."""
    N, nT, M = dims
    return lists[((b * N + (n if N > 1 else 0)) * nT + i) * M + c]


def _listed(b, n, i, c, lists, counts, dims):
    """The list entry of grid step ``c``; past the count, the last listed tile again (the pipeline skips the copy)."""
    return _list_at(lists, dims, b, n, i, jnp.minimum(c, jnp.maximum(_count_at(counts, dims, b, n, i) - 1, 0)))


def _specs(N, K, H, R, block, dims):
    """BlockSpecs on the forward / dQ grid (b, query head n, query tile i, list entry c): ``own`` = the tile the
    program writes, ``listed`` = the key tile its list entry names. GQA kv head = n // (N // K)."""
    G = N // K
    kv_head = lambda n: jax.lax.div(n, G)  # noqa: E731  (n // G lowers through sign(), which Mosaic ties to a chip)
    own = lambda b, n, i, c, L, Cn: (b, n, i, 0)  # noqa: E731
    return dict(
        head_own=pl.BlockSpec((None, None, block, H), own),
        kv_listed=pl.BlockSpec((None, None, block, H),
                               lambda b, n, i, c, L, Cn: (b, kv_head(n), _listed(b, n, i, c, L, Cn, dims), 0)),
        stat_own=pl.BlockSpec((None, None, block, 1), own),
        col_own=pl.BlockSpec((None, block, 1), lambda b, n, i, c, L, Cn: (b, i, 0)),
        row_listed=pl.BlockSpec((None, 1, block), lambda b, n, i, c, L, Cn: (b, 0, _listed(b, n, i, c, L, Cn, dims))),
        sel_own=pl.BlockSpec((None, None, block, R), own),
    )


def _dkv_specs(N, K, H, R, block, dims):
    """BlockSpecs on the dK/dV grid (b, kv head, key tile j, e): query head ``kv G + e // width``, its list entry
    ``e % width`` names the query tile."""
    G, width = N // K, dims[2]

    def head_entry(kv, e):
        return kv * G + jax.lax.div(e, width), jax.lax.rem(e, width)

    def listed(b, kv, j, e, L, Cn):
        n, c = head_entry(kv, e)
        return n, _listed(b, n, j, c, L, Cn, dims)

    def head_listed(b, kv, j, e, L, Cn):
        n, i = listed(b, kv, j, e, L, Cn)
        return b, n, i, 0

    own = lambda b, kv, j, e, L, Cn: (b, kv, j, 0)  # noqa: E731
    return dict(
        head_listed=pl.BlockSpec((None, None, block, H), head_listed),
        stat_listed=pl.BlockSpec((None, None, block, 1), head_listed),
        sel_listed=pl.BlockSpec((None, None, block, R), head_listed),
        kv_own=pl.BlockSpec((None, None, block, H), own),
        col_listed=pl.BlockSpec((None, block, 1), lambda b, kv, j, e, L, Cn: (b, listed(b, kv, j, e, L, Cn)[1], 0)),
        row_own=pl.BlockSpec((None, 1, block), lambda b, kv, j, e, L, Cn: (b, 0, j)),
    )


def _check_tile(T, block, interpret):
    check_whole_tiles(T, block)
    if not interpret and block % 128 and block != T:
        raise ValueError(f"the TPU kernels need a tile that is a multiple of 128 or the whole sequence, got "
                         f"block={block} for T={T}")


def _scalar_operands(lists, counts, interpret):
    """Lists and counts flattened to 1-D for scalar prefetch (SMEM pads the last dim of an N-D array to 128
    words), plus their ``dims`` (heads, tiles, list width); on a TPU, fails with the sizes past the chip's SMEM
    (``check_smem``)."""
    check_smem(4 * (lists.size + counts.size), f"tile lists {tuple(lists.shape)}", interpret)
    return lists.reshape(-1), counts.reshape(-1), tuple(lists.shape[1:])


def _swap_time_heads(x):
    """``[B, T, N, ...]`` <-> ``[B, N, T, ...]``."""
    return jnp.swapaxes(x, 1, 2)


def _layout(q, k, v, seg, blk, sel):
    heads = _swap_time_heads
    return (heads(q), heads(k), heads(v), seg[..., None], seg[:, None, :], blk[..., None], blk[:, None, :],
            heads(sel))


def forward(q, k, v, meta, spec, scale, block, interpret, out_dtype=None):
    """``(o [B, T, N, H] in out_dtype (default q.dtype), lse [B, N, T] float32)`` as
    ``block_sparse_flash.forward``."""
    fwd_lists, fwd_count, _, _, seg, blk, sel = meta
    B, T, N, H = q.shape
    _check_tile(T, block, interpret)
    lists, counts, dims = _scalar_operands(fwd_lists, fwd_count, interpret)
    s = _specs(N, k.shape[2], H, sel.shape[-1], block, dims)
    q_, k_, v_, seg_c, seg_r, blk_c, blk_r, sel_ = _layout(q, k, v, seg, blk, sel)
    o, lse = pl.pallas_call(
        functools.partial(_fwd_kernel, spec=spec, scale=scale, block=block, dims=dims),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2, grid=(B, N, T // block, fwd_lists.shape[-1]),
            in_specs=[s["head_own"], s["kv_listed"], s["kv_listed"], s["col_own"], s["row_listed"], s["col_own"],
                      s["row_listed"], s["sel_own"]],
            out_specs=[s["head_own"], s["stat_own"]],
            scratch_shapes=[pltpu.VMEM((block, H), jnp.float32), pltpu.VMEM((block, 1), jnp.float32),
                            pltpu.VMEM((block, 1), jnp.float32)]),
        out_shape=[jax.ShapeDtypeStruct(q_.shape, out_dtype or q.dtype),
                   jax.ShapeDtypeStruct((B, N, T, 1), jnp.float32)],
        interpret=interpret,
        compiler_params=tpu_params(interpret, _SEMANTICS),
        name="block_sparse_flash_fwd_tpu",
    )(lists, counts, q_, k_, v_, seg_c, seg_r, blk_c, blk_r, sel_)
    return _swap_time_heads(o), lse[..., 0]


def backward(q, k, v, o, lse, do, meta, spec, scale, block, interpret, grad_dtype=None):
    """``(dq, dk, dv)`` as ``block_sparse_flash.backward`` (in ``grad_dtype``, default the input dtypes); the
    dK/dV kernel sums each GQA group in VMEM."""
    fwd_lists, fwd_count, bwd_lists, bwd_count, seg, blk, sel = meta
    B, T, N, H = q.shape
    K = k.shape[2]
    lists, counts, dims = _scalar_operands(fwd_lists, fwd_count, interpret)
    s = _specs(N, K, H, sel.shape[-1], block, dims)
    delta = row_delta(o, do)[..., None]
    lse = lse[..., None]
    q_, k_, v_, seg_c, seg_r, blk_c, blk_r, sel_ = _layout(q, k, v, seg, blk, sel)
    do_ = _swap_time_heads(do)
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, spec=spec, scale=scale, block=block, dims=dims),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2, grid=(B, N, T // block, fwd_lists.shape[-1]),
            in_specs=[s["head_own"], s["kv_listed"], s["kv_listed"], s["head_own"], s["stat_own"], s["stat_own"],
                      s["col_own"], s["row_listed"], s["col_own"], s["row_listed"], s["sel_own"]],
            out_specs=s["head_own"],
            scratch_shapes=[pltpu.VMEM((block, H), jnp.float32)]),
        out_shape=jax.ShapeDtypeStruct(q_.shape, grad_dtype or q.dtype),
        interpret=interpret,
        compiler_params=tpu_params(interpret, _SEMANTICS),
        name="block_sparse_flash_dq_tpu",
    )(lists, counts, q_, k_, v_, do_, lse, delta, seg_c, seg_r, blk_c, blk_r, sel_)
    lists, counts, dims = _scalar_operands(bwd_lists, bwd_count, interpret)
    width = dims[2]
    sk = _dkv_specs(N, K, H, sel.shape[-1], block, dims)
    kv_shape = jax.ShapeDtypeStruct(k_.shape, grad_dtype or k.dtype)
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, spec=spec, scale=scale, block=block, group=N // K, dims=dims),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2, grid=(B, K, T // block, (N // K) * width),
            in_specs=[sk["head_listed"], sk["kv_own"], sk["kv_own"], sk["head_listed"], sk["stat_listed"],
                      sk["stat_listed"], sk["col_listed"], sk["row_own"], sk["col_listed"], sk["row_own"],
                      sk["sel_listed"]],
            out_specs=[sk["kv_own"], sk["kv_own"]],
            scratch_shapes=[pltpu.VMEM((block, H), jnp.float32), pltpu.VMEM((block, H), jnp.float32)]),
        out_shape=[kv_shape, kv_shape],
        interpret=interpret,
        compiler_params=tpu_params(interpret, _SEMANTICS),
        name="block_sparse_flash_dkv_tpu",
    )(lists, counts, q_, k_, v_, do_, lse, delta, seg_c, seg_r, blk_c, blk_r, sel_)
    return _swap_time_heads(dq), _swap_time_heads(dk), _swap_time_heads(dv)
