"""Inverse of unit lower-triangular matrices with matmuls only (no LAPACK custom call).

``jax.scipy.linalg.solve_triangular`` lowers on CPU to ``lapack_strsm_ffi``, a call into SciPy's OpenBLAS made
from XLA's worker threads; inside the chunked gated-delta-rule scan that is the one foreign call of the whole
model, and processes running many such programs hung intermittently in XLA:CPU (every thread idle, the caller
waiting in ``BlockUntilReady``). The inverse below is plain XLA on every backend (CPU, GPU, TPU) and is what the
chunk needs anyway (fla's kernels also form the explicit inverse ``(I + A)^-1``).

Recursive 2 x 2 blocks: ``[[A, 0], [B, D]]^-1 = [[A^-1, 0], [-D^-1 B A^-1, D^-1]]``. Starting from the 1 x 1
diagonal blocks (inverse 1), each of ``ceil(log2 n)`` levels doubles the block size with two batched matmuls;
``n`` is padded to a power of two with identity rows. Work ``O(n^3)``, like forward substitution, in
``log2 n`` parallel steps instead of ``n`` sequential ones.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from einops import rearrange

_HIGHEST = jax.lax.Precision.HIGHEST


def unit_lower_inverse(L: jax.Array) -> jax.Array:
    """``inv(L)`` for unit lower-triangular ``L [..., n, n]`` (the diagonal and upper triangle are not read)."""
    n = L.shape[-1]
    if L.shape[-2] != n:
        raise ValueError(f"square matrices expected, got shape {L.shape}")
    size = 1 << max(n - 1, 0).bit_length()  # next power of two >= n
    strict = jnp.tril(L, -1)
    if size != n:
        strict = jnp.pad(strict, [(0, 0)] * (L.ndim - 2) + [(0, size - n), (0, size - n)])
    inv = jnp.ones(L.shape[:-2] + (size, 1, 1), L.dtype)  # [..., blocks, s, s]: the 1 x 1 diagonal blocks
    s = 1
    while s < size:
        # B blocks: rows [2ps + s, 2ps + 2s), cols [2ps, 2ps + s) of each pair p
        tiles = rearrange(strict, "... (p a i) (q b j) -> ... p q a b i j", a=2, b=2, i=s, j=s)
        lower = jnp.diagonal(tiles[..., 1, 0, :, :], axis1=-4, axis2=-3)  # [..., s, s, p]
        lower = jnp.moveaxis(lower, -1, -3)  # [..., p, s, s]
        a_inv, d_inv = inv[..., 0::2, :, :], inv[..., 1::2, :, :]
        off = -jnp.matmul(jnp.matmul(d_inv, lower, precision=_HIGHEST), a_inv, precision=_HIGHEST)
        zero = jnp.zeros_like(off)
        top = jnp.concatenate([a_inv, zero], axis=-1)
        bottom = jnp.concatenate([off, d_inv], axis=-1)
        inv = jnp.concatenate([top, bottom], axis=-2)  # [..., size / 2s, 2s, 2s]
        s *= 2
    return inv[..., 0, :n, :n]
