"""Sliding-window (and full causal) flash attention: each query tile visits only the band of key tiles that
can hold keys inside its window, on the ``block_sparse_flash`` core (exact per-token mask inside the band). The
caller gives ``target`` and ``interpret``."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.block_sparse_flash import BlockSizes, MaskSpec, block_sparse_attention
from pallas_kernels.platform import check_target


def band_lists(B: int, N: int, nT: int, n_prev: int):
    """Tile lists of a causal band: query tile i visits key tiles ``max(0, i - n_prev) .. i``; key tile j is
    visited by query tiles ``j .. min(nT - 1, j + n_prev)``. List width: next power of two >= n_prev + 1."""
    width = 1 << n_prev.bit_length()  # >= n_prev + 1
    c = jnp.arange(width, dtype=jnp.int32)
    i = jnp.arange(nT, dtype=jnp.int32)[:, None]
    first = jnp.maximum(i - n_prev, 0)
    fwd = jnp.minimum(first + c, i)
    fwd_count = (i - first + 1)[:, 0]
    bwd = jnp.minimum(i + c, jnp.minimum(i + n_prev, nT - 1))
    bwd_count = (jnp.minimum(i + n_prev, nT - 1) - i + 1)[:, 0]
    full = lambda x: jnp.broadcast_to(x, (B, N) + x.shape)  # noqa: E731
    return full(fwd), full(fwd_count), full(bwd), full(bwd_count)


def _attend(q, k, v, seg, window, scale, block_sizes, interpret, target):
    check_target(target)
    B, T, N, H = q.shape
    K = k.shape[2]
    if N % K or k.shape != (B, T, K, H) or v.shape != k.shape:
        raise ValueError(f"shape mismatch: q{q.shape} k{k.shape} v{v.shape} (need N % K == 0)")
    if seg.shape != (B, T):
        raise ValueError(f"seg{seg.shape} must be [B, T] = {(B, T)}")
    block = (block_sizes or BlockSizes.get_default(T)).block
    nT = -(-T // block)
    Tp = nT * block
    pad = lambda x: jnp.pad(x, [(0, 0), (0, Tp - T)] + [(0, 0)] * (x.ndim - 2))  # noqa: E731
    q, k, v, seg = pad(q), pad(k), pad(v), pad(seg.astype(jnp.int32))
    n_prev = nT - 1 if window is None else min(nT - 1, -(-(window - 1) // block))
    zeros = jnp.zeros((B, Tp), jnp.int32)
    meta = band_lists(B, N, nT, n_prev) + (seg, zeros, jnp.full((B, Tp, N, 1), -1, jnp.int32))
    scale = H ** -0.5 if scale is None else scale
    o = block_sparse_attention(q, k, v, meta, MaskSpec(window=window), float(scale), block, interpret=interpret,
                               target=target)
    return o[:, :T]


def sliding_window_flash_attention(q, k, v, *, window: int, seg: jax.Array, scale: float | None = None,
                                   block_sizes: BlockSizes | None = None, interpret: bool, target: str):
    """Causal sliding-window GQA attention (query t sees keys s with ``t - window < s <= t`` in its segment).

    Args:
      q: ``[B, T, N, H]``; k, v: ``[B, T, K, H]``; window: W > 0; seg: ``[B, T]`` segment labels (0 = padding).
      scale: default ``H ** -0.5``; block_sizes: kernel tile;
      interpret: run the kernels in interpret mode (True on CPU; a ``pltpu.InterpretParams`` for jax's TPU
        simulator); target: ``"triton"`` (GPU-style kernels) or ``"mosaic_tpu"`` (TPU-style); ValueError
        otherwise.
    Returns:
      ``[B, T, N, H]`` in ``q.dtype``; padding rows are 0.
    """
    if window <= 0:
        raise ValueError(f"{window=} must be positive")
    return _attend(q, k, v, seg, window, scale, block_sizes, interpret, target)


def causal_flash_attention(q, k, v, *, seg: jax.Array, scale: float | None = None,
                           block_sizes: BlockSizes | None = None, interpret: bool, target: str):
    """Causal GQA attention inside segments (every key tile at or before the query tile); arguments as
    ``sliding_window_flash_attention``."""
    return _attend(q, k, v, seg, None, scale, block_sizes, interpret, target)
