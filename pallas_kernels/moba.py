"""MoBA block-sparse attention kernel: per query tile and head, visit only the key tiles of the selected blocks.

The block selection (top-(k-1) earlier blocks per query token and head) is computed outside the kernel, in XLA
(``spb2_jax.ops.moba_blockwise.moba_select_blocks``), and handed in as ``sel [B, T, N, k-1]`` (segment-relative
block indices, -1 = none). From it, ``moba_tile_lists`` builds for every (row, head, query tile) the ascending
list of key tiles covering the union of the tile's own blocks and selected blocks (a difference array over key
tiles, then a cumulative sum: no ``[T, T]`` array), and the transposed lists for the dK/dV kernel. The kernel
(``block_sparse_flash``) masks per token: same segment, causal, key in the query's own block or one of its
selected blocks. That is ``algorithm="union"``; it does dense causal work when a tile's tokens select different
blocks, so the default is ``algorithm="gathered"`` (``moba_gathered``: work = the selected pairs; GPU-style and
TPU-style kernels). The caller gives ``target`` and ``interpret``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.block_sparse_flash import BlockSizes, MaskSpec, block_sparse_attention, tile_lists
from pallas_kernels.moba_gathered import moba_gathered_attention
from pallas_kernels.platform import check_target

ALGORITHMS = ("gathered", "union")


def _pad_time(x: jax.Array, size: int, value=0) -> jax.Array:
    widths = [(0, 0)] * x.ndim
    widths[1] = (0, size - x.shape[1])
    return jnp.pad(x, widths, constant_values=value)


def moba_tile_lists(sel: jax.Array, seg: jax.Array, pos: jax.Array, chunk_size: int, block: int):
    """``need [B, N, nT, nT]`` of MoBA as tile lists (see ``block_sparse_flash.tile_lists``).

    Token t (segment label ``seg``, position ``pos`` in its segment) with selected blocks ``sel[t, n]`` needs
    keys ``[t - pos % C, t]`` (own block) and ``[t - pos + r C, t - pos + (r + 1) C)`` for every selected r
    (earlier blocks are complete). ``T`` must be a multiple of ``block``.
    """
    B, T, N, R = sel.shape
    nT = T // block
    t = jnp.arange(T, dtype=jnp.int32)[None, :, None, None]  # [1, T, 1, 1]
    start = t - pos[:, :, None, None]  # segment start of every token
    own_lo = t - (pos % chunk_size)[:, :, None, None]
    lo = jnp.concatenate([jnp.broadcast_to(own_lo, (B, T, N, 1)), start + sel * chunk_size], axis=-1)
    hi = jnp.concatenate([jnp.broadcast_to(t, (B, T, N, 1)), start + sel * chunk_size + chunk_size - 1], axis=-1)
    valid = (seg != 0)[:, :, None, None] & jnp.concatenate(
        [jnp.ones((B, T, N, 1), bool), sel >= 0], axis=-1)  # [B, T, N, 1 + R]
    b = jnp.broadcast_to(jnp.arange(B)[:, None, None, None], lo.shape)
    n = jnp.broadcast_to(jnp.arange(N)[None, None, :, None], lo.shape)
    qt = jnp.broadcast_to(t // block, lo.shape)
    ones = valid.astype(jnp.int32)
    diff = jnp.zeros((B, N, nT, nT + 1), jnp.int32)
    diff = diff.at[b, n, qt, jnp.clip(lo // block, 0, nT)].add(ones)
    diff = diff.at[b, n, qt, jnp.clip(hi // block + 1, 0, nT)].add(-ones)
    need = jnp.cumsum(diff, axis=-1)[..., :nT] > 0
    return tile_lists(need)


def moba_flash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    sel: jax.Array,
    seg: jax.Array,
    pos: jax.Array,
    chunk_size: int,
    scale: float | None = None,
    block_sizes: BlockSizes | None = None,
    interpret: bool,
    target: str,
    algorithm: str | None = None,
) -> jax.Array:
    """MoBA attention with Pallas kernels (forward and backward).

    Args:
      q: ``[B, T, N, H]``; k, v: ``[B, T, K, H]`` (GQA, ``N % K == 0``).
      sel: ``[B, T, N, R]`` int32 selected earlier blocks per token and head (segment-relative, -1 = none).
      seg: ``[B, T]`` int32 segment labels (0 = padding; equal labels = same segment, contiguous).
      pos: ``[B, T]`` int32 position of every token inside its segment.
      chunk_size: MoBA block size C. scale: default ``H ** -0.5``.
      block_sizes: kernel tile (default ``BlockSizes.get_default(T)``).
      interpret: run the kernels in interpret mode (True on CPU; a ``pltpu.InterpretParams`` for jax's TPU
        simulator).
      target: ``"triton"`` (GPU-style kernels) or ``"mosaic_tpu"`` (TPU-style); ValueError otherwise.
      algorithm: ``"gathered"`` (``moba_gathered``: own block + gathered (token, selected block) rows; work =
        the selected pairs; default, both targets) or ``"union"`` (per query tile, the union of its tokens'
        selected key tiles; dense causal work when they differ).
    Returns:
      ``[B, T, N, H]`` in ``q.dtype``; padding rows are 0.
    """
    B, T, N, H = q.shape
    K = k.shape[2]
    if N % K or k.shape != (B, T, K, H) or v.shape != k.shape:
        raise ValueError(f"shape mismatch: q{q.shape} k{k.shape} v{v.shape} (need N % K == 0)")
    if sel.shape[:3] != (B, T, N) or seg.shape != (B, T) or pos.shape != (B, T):
        raise ValueError(f"metadata shapes: sel{sel.shape} seg{seg.shape} pos{pos.shape} for q{q.shape}")
    check_target(target)
    algorithm = algorithm or "gathered"
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm={algorithm!r} must be one of {ALGORITHMS}")
    block = (block_sizes or BlockSizes.get_default(T)).block
    Tp = -(-T // block) * block
    scale = H ** -0.5 if scale is None else scale
    if algorithm == "gathered":
        q, k, v = (_pad_time(x, Tp) for x in (q, k, v))
        o = moba_gathered_attention(q, k, v, _pad_time(jax.lax.stop_gradient(sel).astype(jnp.int32), Tp, -1),
                                    _pad_time(seg.astype(jnp.int32), Tp), _pad_time(pos.astype(jnp.int32), Tp),
                                    chunk_size, float(scale), block, interpret, target)
        return o[:, :T]
    R = sel.shape[-1]
    Rp = 1 if R == 0 else 1 << (R - 1).bit_length()  # power of two for the Triton lowering
    sel = jnp.pad(sel.astype(jnp.int32), [(0, 0)] * 3 + [(0, Rp - R)], constant_values=-1)
    q, k, v = (_pad_time(x, Tp) for x in (q, k, v))
    seg, pos = _pad_time(seg.astype(jnp.int32), Tp), _pad_time(pos.astype(jnp.int32), Tp)
    sel = _pad_time(sel, Tp, -1)
    meta = moba_tile_lists(jax.lax.stop_gradient(sel), seg, pos, chunk_size, block) + (seg, pos // chunk_size, sel)
    o = block_sparse_attention(q, k, v, meta, MaskSpec(moba=True), float(scale), block, interpret=interpret,
                               target=target)
    return o[:, :T]
