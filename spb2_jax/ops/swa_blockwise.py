"""Blockwise sliding-window attention: each query tile only reads the key tiles inside its window.

Query tile i (``block_size`` tokens) sees keys ``[i * bs - (window - 1), (i + 1) * bs)``, i.e. its own key tile
and the ``ceil((window - 1) / bs)`` tiles before it. Keys are laid out as one band per query tile, so memory is
``O(T * (window + bs))`` instead of ``O(T^2)``; everything is vectorised (no loop), and reverse-mode autodiff
keeps the same linear memory.

Shape letters: see ``spb2_jax.parallel.rules`` (C is the tile ``bs`` in the patterns); lower-case ``n`` counts
tiles (``nT``) and ``w`` the tiles of a band.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from einops import rearrange

from pallas_kernels.block_sparse_flash import BlockSizes
from pallas_kernels.sliding_window import sliding_window_flash_attention
from spb2_jax.ops.attention import dot_product_attention
from spb2_jax.ops.segments import Segments, as_segments, pad_time


def _band(x: jax.Array, n_prev: int, bs: int) -> jax.Array:
    """``[B, nT * bs, ...]`` -> ``[B, nT, (n_prev + 1) * bs, ...]``: tile i with the ``n_prev`` tiles before it."""
    tiles = rearrange(x, "B (n C) ... -> B n C ...", C=bs)
    padded = jnp.concatenate([jnp.zeros_like(tiles[:, :1]).repeat(n_prev, axis=1), tiles], axis=1)
    nT = tiles.shape[1]
    views = [padded[:, j:j + nT] for j in range(n_prev + 1)]  # view j = tile i - n_prev + j
    return rearrange(jnp.stack(views, axis=2), "B n w C ... -> B n (w C) ...")


def sliding_window_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    window: int,
    segment_ids: Segments | jax.Array | None = None,
    scale: float | None = None,
    block_size: int = 128,
    impl: str = "xla",
    interpret: bool = False,
    target: str = "triton",
) -> jax.Array:
    """Causal sliding-window GQA attention: query i sees keys j with ``i - window < j <= i`` in its segment.

    Args:
      q: ``[B, T, N, H]``; k, v: ``[B, T, K, H]`` (``N % K == 0``).
      window: window size W (> 0). segment_ids: ``[B, T]`` ids (0 = padding: zero output) or a ``Segments``.
      scale: default H^-0.5.
      block_size: query/key tile size; memory is O(T * (W + block_size)).
      impl: ``"xla"`` (banded einsum below) or ``"pallas"`` (``pallas_kernels.sliding_window_flash_attention``,
        its tile is ``block_size`` rounded to a power of two, at most 128).
      interpret, target: the Pallas kernel's mode and target (``spb2_jax.options.Kernels``).
    Returns:
      ``[B, T, N, H]`` in ``q.dtype``; equals ``attention_reference(..., window=window)``.
    """
    B, T, N, H = q.shape
    if window <= 0:
        raise ValueError(f"{window=} must be positive")
    if k.shape[:2] != (B, T) or v.shape != k.shape:
        raise ValueError(f"shape mismatch: q{q.shape} k{k.shape} v{v.shape}")
    if impl not in ("xla", "pallas"):
        raise ValueError(f"impl={impl!r} must be 'xla' or 'pallas'")
    labels = as_segments(segment_ids, B, T).labels
    if impl == "pallas":
        return sliding_window_flash_attention(q, k, v, window=window, seg=labels, scale=scale,
                                              block_sizes=BlockSizes.from_request(block_size, T),
                                              interpret=interpret, target=target)
    bs = max(1, min(block_size, T))
    n_prev = -(-(window - 1) // bs)
    qp, kp, vp = (pad_time(x, bs) for x in (q, k, v))
    segp = pad_time(labels, bs)  # padded tail: segment 0
    idx = jnp.arange(segp.shape[1], dtype=jnp.int32)
    qi = rearrange(idx, "(n C) -> n C", C=bs)  # [nT, bs]
    ki = _band(jnp.broadcast_to(idx, segp.shape), n_prev, bs)[0]  # [nT, (n_prev+1) bs]
    kseg = _band(segp, n_prev, bs)  # [B, nT, S]; padding before the start has segment 0
    qseg = rearrange(segp, "B (n C) -> B n C", C=bs)
    mask = ((qseg[..., :, None] == kseg[..., None, :]) & (qseg[..., :, None] != 0)
            & (ki[None, :, None, :] <= qi[None, :, :, None]) & (qi[None, :, :, None] - ki[None, :, None, :] < window))
    fold = lambda x: rearrange(x, "B n ... -> (B n) ...")  # noqa: E731
    o = dot_product_attention(fold(rearrange(qp, "B (n C) N H -> B n C N H", C=bs)),
                              fold(_band(kp, n_prev, bs)), fold(_band(vp, n_prev, bs)), fold(mask), scale=scale)
    return rearrange(o, "(B n) C N H -> B (n C) N H", B=B)[:, :T]
