"""Block-sparse flash attention in Pallas: the shared core of the MoBA and sliding-window kernels.

Every query tile of ``block`` tokens (per batch row and query head) visits a *list* of key tiles, computed
outside the kernel in XLA (``tile_lists``), and applies an exact per-token mask inside the visited tiles:

    mask(t, s) = seg_t == seg_s != 0  and  s <= t
                 and (t - s < window)                                    if window is set
                 and (blk_s == blk_t or blk_s in sel[t, n, :])           if MoBA selection is given

where ``seg`` are segment labels (0 = padding), ``blk`` the segment-relative MoBA block of each token and
``sel [B, T, N, R]`` the selected earlier blocks of each query token and head (-1 = none). The lists only have
to be supersets of the tiles that hold unmasked keys; tight lists are what makes the kernel fast.

Kernels (GPU style, as jax's ``pallas/ops/gpu/attention.py``: the grid runs over (batch, head, tile) and a
``fori_loop`` inside the kernel walks the tile list, loading K/V tiles with dynamic slices):

- ``_fwd_kernel``: online softmax with float32 statistics, writes ``o`` and the log-sum-exp ``lse``.
- ``_dq_kernel``: same walk, ``dq = sum_j dS_ij K_j`` with ``dS = P * (dP - delta)``, ``delta = rowsum(dO * O)``.
- ``_dkv_kernel``: per (kv head, key tile), walks the *transposed* lists (query tiles that visit it) of each
  query head of the GQA group in turn and accumulates the group's ``dK``/``dV``.

Inputs of dtype bfloat16 use bfloat16 matmul operands (``P`` rounded to the input dtype before ``P V``, as in
flash attention) with float32 accumulation; float32 inputs stay float32 (``Precision.HIGHEST``: no TF32). The
per-token mask, the matmul and the tile steps live in ``_flash_common``, shared with the TPU-style twins and
``moba_gathered``.

The caller picks the kernels: ``target="triton"`` (these, lowered through Pallas' Triton backend on GPU) or
``"mosaic_tpu"`` (the TPU-style twins of ``block_sparse_flash_tpu``); ``forward`` / ``backward`` and
``block_sparse_attention`` dispatch on it. ``interpret=True`` runs either on CPU (tests).

Shape letters: see ``spb2_jax.parallel.rules`` (N query heads, K kv heads, G group, H head dim); here also ``R``
selected blocks per token, ``M`` the length of a tile list and ``nT`` the number of tiles.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import block_sparse_flash_tpu
from pallas_kernels._flash_common import (MASKED, check_whole_tiles, dkv_step, dq_step, row_delta, softmax_finish,
                                          softmax_init, softmax_step, token_mask)
from pallas_kernels.platform import check_target, triton_params


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile size shared by queries and keys: a power of two for the Triton lowering; the TPU kernels also need a
    multiple of 128 or the whole padded sequence (the default, 128, is both)."""

    block: int = 128

    @classmethod
    def get_default(cls, seq_len: int) -> "BlockSizes":
        """128, or the smallest power of two >= 16 covering a shorter sequence."""
        return cls(block=min(128, max(16, pl.next_power_of_2(seq_len))))

    @classmethod
    def from_request(cls, block_size: int, seq_len: int) -> "BlockSizes":
        """A caller's tile size rounded down to a power of two, capped by ``get_default(seq_len)``."""
        requested = 1 << (max(block_size, 1).bit_length() - 1)
        return cls(block=min(requested, cls.get_default(seq_len).block))


@dataclasses.dataclass(frozen=True)
class MaskSpec:
    """Static part of the mask: the sliding window (None = unlimited) and whether MoBA block lists are used."""

    window: int | None = None
    moba: bool = False


# ----------------------------------------------------------------------------------------------- tile lists

def lists_from_need(need: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Boolean ``need [..., nT, nT]`` -> (ascending tile indices ``[..., nT, nT]`` int32, counts ``[..., nT]``).

    Entries past the count repeat valid indices and are never read by the kernels."""
    order = jnp.argsort(jnp.logical_not(need), axis=-1, stable=True).astype(jnp.int32)
    return order, need.sum(-1).astype(jnp.int32)


def tile_lists(need: jax.Array):
    """Forward lists (key tiles per query tile) and transposed lists (query tiles per key tile) of ``need
    [B, N, nT_q, nT_k]``."""
    return lists_from_need(need) + lists_from_need(jnp.swapaxes(need, -1, -2))


# ----------------------------------------------------------------------------------------------- kernels

def _gpu_mask(spec, q_pos, q_seg, q_blk, q_sel, k_pos, k_seg, k_blk):
    """``token_mask`` from the 1-D per-token vectors the GPU-style kernels load (``q_sel``: columns ``[tq]`` read one
    by one from the ref: Triton cannot slice a loaded array)."""
    col, row = (lambda x: x[:, None]), (lambda x: x[None, :])  # noqa: E731
    return token_mask(spec, col(q_pos) - row(k_pos), col(q_seg), row(k_seg), col(q_blk), row(k_blk),
                      [col(c) for c in q_sel])


def _columns(sel_ref, rows=slice(None), *head):
    """The MoBA selection columns ``sel[rows, (head,) r]`` loaded one by one from the ref."""
    return [sel_ref[(rows, *head, r)] for r in range(sel_ref.shape[-1])]


def _fwd_kernel(lists_ref, count_ref, q_ref, k_ref, v_ref, qseg_ref, kseg_ref, qblk_ref, kblk_ref, sel_ref,
                o_ref, lse_ref, *, spec, scale, block):
    i = pl.program_id(2)
    q = q_ref[...]  # [t, H]
    q_pos = i * block + jnp.arange(block, dtype=jnp.int32)
    q_seg, q_blk, q_sel = qseg_ref[...], qblk_ref[...], _columns(sel_ref)

    def visit(c, carry):
        j = lists_ref[c]
        sl = pl.ds(pl.multiple_of(j * block, block), block)
        mask = _gpu_mask(spec, q_pos, q_seg, q_blk, q_sel, j * block + jnp.arange(block, dtype=jnp.int32),
                         kseg_ref[sl], kblk_ref[sl])
        return softmax_step(carry, q, k_ref[sl, :], v_ref[sl, :], mask, scale)

    o, lse = softmax_finish(*jax.lax.fori_loop(0, count_ref[0], visit, softmax_init(block, q.shape[-1])))
    o_ref[...] = o.astype(o_ref.dtype)
    lse_ref[...] = lse


def _dq_kernel(lists_ref, count_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qseg_ref, kseg_ref,
               qblk_ref, kblk_ref, sel_ref, dq_ref, *, spec, scale, block):
    i = pl.program_id(2)
    q, do = q_ref[...], do_ref[...]
    lse, delta = lse_ref[...], delta_ref[...]
    q_pos = i * block + jnp.arange(block, dtype=jnp.int32)
    q_seg, q_blk, q_sel = qseg_ref[...], qblk_ref[...], _columns(sel_ref)

    def visit(c, dq):
        j = lists_ref[c]
        sl = pl.ds(pl.multiple_of(j * block, block), block)
        mask = _gpu_mask(spec, q_pos, q_seg, q_blk, q_sel, j * block + jnp.arange(block, dtype=jnp.int32),
                         kseg_ref[sl], kblk_ref[sl])
        return dq_step(dq, q, k_ref[sl, :], v_ref[sl, :], do, lse, delta, mask, scale)

    dq = jax.lax.fori_loop(0, count_ref[0], visit, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _dkv_kernel(lists_ref, count_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qseg_ref, kseg_ref,
                qblk_ref, kblk_ref, sel_ref, dk_ref, dv_ref, *, spec, scale, block):
    """One (row, kv head, key tile) program: for each query head g of the GQA group in turn, walk its transposed
    list (query tiles that visit this key tile); the group's dK/dV accumulate in registers."""
    j = pl.program_id(2)
    k, v = k_ref[...], v_ref[...]  # [s, H]
    k_pos = j * block + jnp.arange(block, dtype=jnp.int32)
    k_seg, k_blk = kseg_ref[...], kblk_ref[...]
    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = zeros, zeros
    for g in range(lists_ref.shape[0]):  # static: the group's query heads

        def visit(c, carry, g=g):
            i = lists_ref[g, c]
            sl = pl.ds(pl.multiple_of(i * block, block), block)
            mask = _gpu_mask(spec, i * block + jnp.arange(block, dtype=jnp.int32), qseg_ref[sl], qblk_ref[sl],
                             _columns(sel_ref, sl, g), k_pos, k_seg, k_blk)
            return dkv_step(carry, q_ref[sl, g, :], k, v, do_ref[sl, g, :], lse_ref[g, sl], delta_ref[g, sl], mask,
                            scale)

        dk, dv = jax.lax.fori_loop(0, count_ref[g, 0], visit, (dk, dv))
    dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


# ----------------------------------------------------------------------------------------------- pallas calls

def _specs(B, N, K, T, H, R, M, block):
    """BlockSpecs of the forward and dQ kernels; grid = (B, N, T // block), GQA kv head = n // (N // K)."""
    G = N // K
    tile = lambda b, n, i: (b, i, n, 0)  # noqa: E731
    whole_kv = lambda b, n, i: (b, 0, n // G, 0)  # noqa: E731
    return dict(
        lists=pl.BlockSpec((None, None, None, M), lambda b, n, i: (b, n, i, 0)),
        count=pl.BlockSpec((None, None, None, 1), lambda b, n, i: (b, n, i, 0)),
        q_tile=pl.BlockSpec((None, block, None, H), tile),
        kv_whole=pl.BlockSpec((None, T, None, H), whole_kv),
        row_tile=pl.BlockSpec((None, None, block), lambda b, n, i: (b, n, i)),
        tok_tile=pl.BlockSpec((None, block), lambda b, n, i: (b, i)),
        tok_whole=pl.BlockSpec((None, T), lambda b, n, i: (b, 0)),
        sel_tile=pl.BlockSpec((None, block, None, R), tile),
    )


def _group_specs(N, K, T, H, R, M, block):
    """BlockSpecs of the dK/dV kernel: grid = (B, K, T // block), the GQA group's query heads ``kv G .. kv G +
    G - 1`` as one block of G heads."""
    G = N // K
    return dict(
        lists=pl.BlockSpec((None, G, None, M), lambda b, kv, j: (b, kv, j, 0)),
        count=pl.BlockSpec((None, G, None, 1), lambda b, kv, j: (b, kv, j, 0)),
        q_whole=pl.BlockSpec((None, T, G, H), lambda b, kv, j: (b, 0, kv, 0)),
        kv_tile=pl.BlockSpec((None, block, None, H), lambda b, kv, j: (b, j, kv, 0)),
        row_whole=pl.BlockSpec((None, G, T), lambda b, kv, j: (b, kv, 0)),
        tok_tile=pl.BlockSpec((None, block), lambda b, kv, j: (b, j)),
        tok_whole=pl.BlockSpec((None, T), lambda b, kv, j: (b, 0)),
        sel_whole=pl.BlockSpec((None, T, G, R), lambda b, kv, j: (b, 0, kv, 0)),
    )


def _triton_forward(q, k, v, meta, spec, scale, block, interpret, out_dtype):
    """``forward`` with the GPU-style kernels."""
    fwd_lists, fwd_count, _, _, seg, blk, sel = meta
    B, T, N, H = q.shape
    check_whole_tiles(T, block)  # the grid would drop the tail rows
    K = k.shape[2]
    s = _specs(B, N, K, T, H, sel.shape[-1], fwd_lists.shape[-1], block)
    return pl.pallas_call(
        functools.partial(_fwd_kernel, spec=spec, scale=scale, block=block),
        grid=(B, N, T // block),
        in_specs=[s["lists"], s["count"], s["q_tile"], s["kv_whole"], s["kv_whole"], s["tok_tile"],
                  s["tok_whole"], s["tok_tile"], s["tok_whole"], s["sel_tile"]],
        out_specs=[s["q_tile"], s["row_tile"]],
        out_shape=[jax.ShapeDtypeStruct(q.shape, out_dtype), jax.ShapeDtypeStruct((B, N, T), jnp.float32)],
        interpret=interpret,
        compiler_params=triton_params(interpret),
        name="block_sparse_flash_fwd",
    )(fwd_lists, fwd_count[..., None], q, k, v, seg, seg, blk, blk, sel)


def _triton_backward(q, k, v, o, lse, do, meta, spec, scale, block, interpret, grad_dtype):
    """``backward`` with the GPU-style kernels."""
    fwd_lists, fwd_count, bwd_lists, bwd_count, seg, blk, sel = meta
    B, T, N, H = q.shape
    K = k.shape[2]
    s = _specs(B, N, K, T, H, sel.shape[-1], fwd_lists.shape[-1], block)
    delta = row_delta(o, do)
    grid = (B, N, T // block)
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, spec=spec, scale=scale, block=block),
        grid=grid,
        in_specs=[s["lists"], s["count"], s["q_tile"], s["kv_whole"], s["kv_whole"], s["q_tile"], s["row_tile"],
                  s["row_tile"], s["tok_tile"], s["tok_whole"], s["tok_tile"], s["tok_whole"], s["sel_tile"]],
        out_specs=s["q_tile"],
        out_shape=jax.ShapeDtypeStruct(q.shape, grad_dtype or q.dtype),
        interpret=interpret,
        compiler_params=triton_params(interpret),
        name="block_sparse_flash_dq",
    )(fwd_lists, fwd_count[..., None], q, k, v, do, lse, delta, seg, seg, blk, blk, sel)
    sg = _group_specs(N, K, T, H, sel.shape[-1], bwd_lists.shape[-1], block)
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, spec=spec, scale=scale, block=block),
        grid=(B, K, T // block),
        in_specs=[sg["lists"], sg["count"], sg["q_whole"], sg["kv_tile"], sg["kv_tile"], sg["q_whole"],
                  sg["row_whole"], sg["row_whole"], sg["tok_whole"], sg["tok_tile"], sg["tok_whole"], sg["tok_tile"],
                  sg["sel_whole"]],
        out_specs=[sg["kv_tile"], sg["kv_tile"]],
        out_shape=[jax.ShapeDtypeStruct(k.shape, grad_dtype or k.dtype),
                   jax.ShapeDtypeStruct(v.shape, grad_dtype or v.dtype)],
        interpret=interpret,
        compiler_params=triton_params(interpret),
        name="block_sparse_flash_dkv",
    )(bwd_lists, bwd_count[..., None], q, k, v, do, lse, delta, seg, seg, blk, blk, sel)
    return dq, dk, dv


def forward(q, k, v, meta, spec: MaskSpec, scale: float, block: int, *, interpret: bool, target: str,
            out_dtype=None):
    """``(o [B, T, N, H] in out_dtype (default q.dtype), lse [B, N, T] float32)`` of the listed tiles (no VJP:
    for callers that merge it with more attention, as ``moba_gathered``).

    ``target``: ``"triton"`` (the GPU-style kernels of this module) or ``"mosaic_tpu"`` (their TPU-style twins in
    ``block_sparse_flash_tpu``). Other arguments as ``block_sparse_attention``.
    """
    out_dtype = q.dtype if out_dtype is None else out_dtype
    if check_target(target) == "mosaic_tpu":
        return block_sparse_flash_tpu.forward(q, k, v, meta, spec, scale, block, interpret, out_dtype)
    return _triton_forward(q, k, v, meta, spec, scale, block, interpret, out_dtype)


def backward(q, k, v, o, lse, do, meta, spec: MaskSpec, scale: float, block: int, *, interpret: bool, target: str,
             grad_dtype=None):
    """``(dq, dk, dv)`` in ``grad_dtype`` (default: the dtypes of q, k, v) from the output ``o``, its ``lse`` and
    cotangent ``do`` (``o``/``lse`` may be those of a larger attention this one is part of: the gradient of each
    listed key is the same), by the kernels of ``target`` (as ``forward``)."""
    if check_target(target) == "mosaic_tpu":
        return block_sparse_flash_tpu.backward(q, k, v, o, lse, do, meta, spec, scale, block, interpret,
                                               grad_dtype)
    return _triton_backward(q, k, v, o, lse, do, meta, spec, scale, block, interpret, grad_dtype)


def block_sparse_attention(q, k, v, meta, spec: MaskSpec, scale: float, block: int, *, interpret: bool,
                           target: str):
    """Attention of ``q [B, T, N, H]`` over ``k, v [B, T, K, H]`` restricted to listed tiles and masked per token.

    ``T`` must be a multiple of ``block`` (callers pad with segment 0). ``meta`` = (fwd_lists ``[B, N, nT, M]``,
    fwd_count ``[B, N, nT]``, bwd_lists ``[B, N, nT, M']``, bwd_count (the transposed lists: query tiles per key
    tile), seg ``[B, T]``, blk ``[B, T]``,
    sel ``[B, T, N, R]``), all int32, from ``tile_lists`` and the caller's per-token metadata.
    ``interpret``: run the kernels in interpret mode (CPU). ``target``: ``"triton"`` (the GPU-style kernels of
    this module) or ``"mosaic_tpu"`` (their TPU-style twins in ``block_sparse_flash_tpu``); ValueError otherwise.
    Returns ``o [B, T, N, H]`` in ``q.dtype`` (padding rows 0).
    """
    return _block_sparse_attention(q, k, v, meta, spec, scale, block, interpret, check_target(target))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7, 8))
def _block_sparse_attention(q, k, v, meta, spec, scale, block, interpret, target):
    return forward(q, k, v, meta, spec, scale, block, interpret=interpret, target=target)[0]


def _vjp_fwd(q, k, v, meta, spec, scale, block, interpret, target):
    o, lse = forward(q, k, v, meta, spec, scale, block, interpret=interpret, target=target)
    return o, (q, k, v, o, lse, meta)


def _vjp_bwd(spec, scale, block, interpret, target, res, do):
    q, k, v, o, lse, meta = res
    dq, dk, dv = backward(q, k, v, o, lse, do, meta, spec, scale, block, interpret=interpret, target=target)
    return dq, dk, dv, jax.tree_util.tree_map(lambda _: None, meta)


_block_sparse_attention.defvjp(_vjp_fwd, _vjp_bwd)


def dense_mask(seg: jax.Array, blk: jax.Array, sel: jax.Array, spec: MaskSpec) -> jax.Array:
    """The kernels' per-token mask for every (query, key) pair: ``[B, N, T, T]`` boolean (tests, references)."""
    T = seg.shape[1]
    pos = jnp.arange(T, dtype=jnp.int32)
    return jax.vmap(lambda sg, bk, sl: jax.vmap(
        lambda s_n: _gpu_mask(spec, pos, sg, bk, [s_n[:, r] for r in range(s_n.shape[-1])], pos, sg, bk),
        in_axes=1)(sl))(seg, blk, sel)


def block_sparse_attention_reference(q, k, v, seg, blk, sel, spec: MaskSpec, scale: float):
    """Dense ``[T, T]`` twin of ``block_sparse_attention`` (no tile lists: every key is considered), float32."""
    B, T, N, H = q.shape
    K = k.shape[2]
    mask = dense_mask(seg, blk, sel, spec)  # [B, N, T, T]
    qg = q.astype(jnp.float32).reshape(B, T, K, N // K, H)
    logits = jnp.einsum("BTKGH,BSKH->BKGTS", qg, k.astype(jnp.float32)).reshape(B, N, T, T) * scale
    logits = jnp.where(mask, logits, MASKED)
    p = jnp.where(mask, jnp.exp(logits - logits.max(-1, keepdims=True)), 0.0)
    p = p / jnp.maximum(p.sum(-1, keepdims=True), 1e-30)
    o = jnp.einsum("BKGTS,BSKH->BTKGH", p.reshape(B, K, N // K, T, T), v.astype(jnp.float32))
    return o.reshape(B, T, N, H).astype(q.dtype)
