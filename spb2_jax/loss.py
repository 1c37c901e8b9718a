"""Memory-lean causal-LM cross-entropy: the LM head and the loss together, without the ``[B, T, V]`` logits.

The plain loss (``spb2_jax.model.causal_lm_loss``, the reference for this module) takes the ``[B, T, V]``
logits: with V = 151,936 that is 19.9 GB of float32 at T = 32,768, and its backward holds several more arrays of
that size. Here the final normed hidden states ``[B, T, D]`` and the head kernel ``[D, V]`` go in instead.

Forward: a ``jax.lax.scan`` over sequence tiles of ``C = tile_size`` tokens computes each tile's logits
``[B, C, V]`` and its log-softmax statistics, keeping only the running NLL sum and two ``[B, T]`` per-token
statistics (the max logit and the log of the shifted exp-sum) for the backward.

Backward (``jax.custom_vjp``): a loop over vocabulary chunks of ``Vc ~ V / n_tiles`` columns recomputes the
logits ``[B, T, Vc]`` of the chunk, turns them into ``dlogits = g * (softmax - onehot)`` with the saved
statistics, writes the chunk's kernel gradient ``[D, Vc]`` in place and adds its hidden gradient to a float32
``[B, T, D]`` accumulator. The chunk holds as many logits as a forward tile (``B * T * Vc ~ B * C * V``), and every
kernel-gradient column is one full contraction over B and T, so no ``[D, V]`` partial gradient is ever
materialised. (Tiling the backward over the sequence instead, e.g. autodiff of a ``jax.checkpoint``-ed tile scan,
adds a ``[D, V]`` per-tile kernel gradient to a ``[D, V]`` accumulator: on XLA:CPU that alone is 1.56 GB of
temporaries at D = 2,560, V = 151,936, and measured 10-17 % of the 32k logits for tiles of 128-1,024 tokens.)
Matmuls: one in the forward, three in the backward, as autodiff with rematerialisation.

Numerics: a tile's logits are computed exactly like the model's head (``nn.Dense(dtype=dtype)`` /
``nn.Embed.attend``): ``hidden.astype(dtype) @ kernel.astype(dtype)`` in the compute dtype ``dtype =
hidden.dtype``, then cast to the accumulation dtype (``acc_dtype``: float32, float64 under ``jax_enable_x64``
with float64 inputs) and put through the same shifted log-sum-exp as ``jax.nn.log_softmax``; so the per-token
losses are those of the plain path and only the order of the final sums differs. The gradient matmuls take
``dlogits`` in the compute dtype (as the plain backward does) and accumulate in the accumulation dtype.

Letters: B batch, T time, D model dim, V vocabulary, n number of tiles, C tile size.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from spb2_jax.ops.dtypes import acc_dtype

IGNORE_INDEX = -100
_LANE = 128  # vocabulary chunks are multiples of this (accelerator lane width)


def tiled_cross_entropy(
    hidden: jax.Array, head_kernel: jax.Array, targets: jax.Array, *, tile_size: int = 512,
) -> tuple[jax.Array, jax.Array]:
    """Summed cross-entropy of ``hidden @ head_kernel`` against ``targets``, one sequence tile at a time.

    Args:
      hidden: ``[B, T, D]`` final normed hidden states in the compute dtype (the logits' dtype).
      head_kernel: ``[D, V]`` LM-head kernel (any float dtype; for tied embeddings pass ``embedding.T``).
      targets: ``[B, T]`` int target ids; ``IGNORE_INDEX`` (-100) tokens are left out.
      tile_size: tokens per forward tile (static); bounds the logits held at once to about ``B * tile_size * V``
        in the forward and the backward. T need not be a multiple (the last tile is padded with ignored tokens).

    Returns:
      ``(nll_sum, count)``: the negative log-likelihood summed over non-ignored tokens (accumulation dtype:
      float32, float64 under x64 with float64 ``hidden``) and the number of non-ignored tokens (int32).
      Differentiable w.r.t. ``hidden`` and ``head_kernel``.
    """
    _check_shapes(hidden, head_kernel, targets)
    if not isinstance(tile_size, int) or tile_size < 1:
        raise ValueError(f"{tile_size=} must be a positive int")
    return _tiled_ce(hidden, head_kernel, targets.astype(jnp.int32), tile_size)


def token_nll(hidden: jax.Array, head_kernel: jax.Array, targets: jax.Array, *, tile_size: int = 512) -> jax.Array:
    """Per-token negative log-likelihood ``[B, T]`` of ``hidden @ head_kernel`` against ``targets`` (accumulation
    dtype; 0 where ``targets == IGNORE_INDEX``), one sequence tile of logits at a time as ``tiled_cross_entropy``
    (same arguments; no gradient rule: for evaluation)."""
    _check_shapes(hidden, head_kernel, targets)
    return _ce_forward(hidden, head_kernel, targets.astype(jnp.int32), tile_size)[4]


def _check_shapes(hidden: jax.Array, head_kernel: jax.Array, targets: jax.Array) -> None:
    if hidden.ndim != 3 or head_kernel.ndim != 2 or hidden.shape[-1] != head_kernel.shape[0]:
        raise ValueError(f"expected hidden [B, T, D] and head_kernel [D, V], got {hidden.shape=} and "
                         f"{head_kernel.shape=}")
    if targets.shape != hidden.shape[:2]:
        raise ValueError(f"targets shape {targets.shape} != hidden batch/time shape {hidden.shape[:2]}")


def _tiles(T: int, tile_size: int) -> tuple[int, int]:
    """``(C, n)``: tile size (never above T, so a short sequence is one unpadded tile) and number of tiles."""
    C = max(1, min(tile_size, T))
    return C, -(-T // C)


def _vocab_chunk(V: int, n_tiles: int) -> int:
    """Backward vocabulary chunk: about ``V / n_tiles`` columns (a forward tile's worth of logits), rounded down
    to a multiple of ``_LANE``, at least ``_LANE``, at most V."""
    return min(V, max(_LANE, V // max(n_tiles, 1) // _LANE * _LANE))


def _ce_forward(
    hidden: jax.Array, head_kernel: jax.Array, targets: jax.Array, tile_size: int,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """``(nll_sum, count, x_max [B, T], log_sum [B, T], nll [B, T])`` over sequence tiles; ``log_softmax(x) = x -
    x_max - log_sum`` per token (the statistics the backward needs); ``nll`` per token, 0 where ignored."""
    B, T, D = hidden.shape
    C, n = _tiles(T, tile_size)
    dtype, acc = hidden.dtype, acc_dtype(hidden)  # the plain loss's acc_dtype(logits): logits are in dtype
    kernel = head_kernel.astype(dtype)  # [D, V], as nn.Dense(dtype=dtype)
    pad = n * C - T
    h_tiles = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0))).reshape(B, n, C, D)  # [B, n, C, D]
    h_tiles = jnp.moveaxis(h_tiles, 1, 0)  # [n, B, C, D] (a bitcast when B == 1)
    t_tiles = jnp.pad(targets, ((0, 0), (0, pad)), constant_values=IGNORE_INDEX).reshape(B, n, C)  # [B, n, C]
    t_tiles = jnp.moveaxis(t_tiles, 1, 0)  # [n, B, C]

    def step(carry, tile):
        nll_sum, count = carry
        h, t = tile  # [B, C, D], [B, C]
        logits = jax.lax.dot_general(h, kernel, (((2,), (0,)), ((), ())))  # [B, C, V] in dtype
        x = logits.astype(acc)  # [B, C, V]
        x_max = jnp.max(x, axis=-1)  # [B, C]
        shifted = x - x_max[..., None]  # [B, C, V]
        log_sum = jnp.log(jnp.sum(jnp.exp(shifted), axis=-1))  # [B, C]
        valid = t != IGNORE_INDEX  # [B, C]
        picked = jnp.take_along_axis(shifted, jnp.where(valid, t, 0)[..., None], axis=-1)[..., 0]  # [B, C]
        nll = jnp.where(valid, log_sum - picked, 0.0)  # [B, C]; = -log_softmax(x)[target]
        carry = (nll_sum + jnp.sum(nll), count + jnp.sum(valid, dtype=jnp.int32))
        return carry, (x_max, log_sum, nll)

    init = (jnp.zeros((), acc), jnp.zeros((), jnp.int32))
    (nll_sum, count), stats = jax.lax.scan(step, init, (h_tiles, t_tiles))  # stats [n, B, C]
    x_max, log_sum, nll = (jnp.moveaxis(x, 0, 1).reshape(B, n * C)[:, :T] for x in stats)  # [B, T] each
    return nll_sum, count, x_max, log_sum, nll


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _tiled_ce(hidden: jax.Array, head_kernel: jax.Array, targets: jax.Array, tile_size: int):
    nll_sum, count, _, _, _ = _ce_forward(hidden, head_kernel, targets, tile_size)
    return nll_sum, count


def _tiled_ce_fwd(hidden, head_kernel, targets, tile_size):
    nll_sum, count, x_max, log_sum, _ = _ce_forward(hidden, head_kernel, targets, tile_size)
    return (nll_sum, count), (hidden, head_kernel, targets, x_max, log_sum)


def _tiled_ce_bwd(tile_size, residuals, cotangents):
    hidden, head_kernel, targets, x_max, log_sum = residuals
    g, _ = cotangents  # d nll_sum (the int count has no cotangent)
    B, T, D = hidden.shape
    V = head_kernel.shape[1]
    dtype, acc = hidden.dtype, acc_dtype(hidden)
    scale = jnp.where(targets != IGNORE_INDEX, g, 0.0).astype(acc)  # [B, T]
    Vc = _vocab_chunk(V, _tiles(T, tile_size)[1])

    def chunk_grads(start, size: int, dh):
        """Chunk ``[start, start + size)``: ``(dh + dlogits @ k^T, dk [D, size])``."""
        k = jax.lax.dynamic_slice_in_dim(head_kernel, start, size, axis=1).astype(dtype)  # [D, Vc]
        x = jax.lax.dot_general(hidden, k, (((2,), (0,)), ((), ()))).astype(acc)  # [B, T, Vc]
        p = jnp.exp((x - x_max[..., None]) - log_sum[..., None])  # [B, T, Vc] softmax
        onehot = targets[..., None] == start + jnp.arange(size)  # [B, T, Vc]
        dlogits = ((p - onehot) * scale[..., None]).astype(dtype)  # [B, T, Vc]
        dk = jnp.einsum("BTD,BTV->DV", hidden, dlogits, preferred_element_type=acc)  # [D, Vc]
        dh = dh + jnp.einsum("BTV,DV->BTD", dlogits, k, preferred_element_type=acc)  # [B, T, D]
        return dh, dk.astype(head_kernel.dtype)

    def body(i, carry):
        dh, dk = carry
        dh, dk_chunk = chunk_grads(i * Vc, Vc, dh)
        return dh, jax.lax.dynamic_update_slice_in_dim(dk, dk_chunk, i * Vc, axis=1)

    n_full = V // Vc
    init = (jnp.zeros((B, T, D), acc), jnp.zeros((D, V), head_kernel.dtype))
    dh, dk = jax.lax.fori_loop(0, n_full, body, init)  # dh [B, T, D], dk [D, V]
    if V > n_full * Vc:  # ragged last chunk, static size
        dh, dk_chunk = chunk_grads(n_full * Vc, V - n_full * Vc, dh)
        dk = dk.at[:, n_full * Vc:].set(dk_chunk)
    return dh.astype(hidden.dtype), dk, None


_tiled_ce.defvjp(_tiled_ce_fwd, _tiled_ce_bwd)


def causal_lm_loss_tiled(
    hidden: jax.Array, head_kernel: jax.Array, labels: jax.Array, aux_losses: jax.Array, aux_loss_coef: float,
    *, tile_size: int = 512,
) -> dict[str, jax.Array]:
    """``spb2_jax.model.causal_lm_loss`` of ``hidden @ head_kernel`` without materialising the ``[B, T, V]`` logits.

    CE of position t's logits against ``labels[:, t + 1]`` (ignore index -100, mean over non-ignored positions;
    the last position is ignored) plus ``aux_loss_coef * sum(aux_losses)``.

    Args:
      hidden: ``[B, T, D]`` final normed hidden states in the compute dtype.
      head_kernel: ``[D, V]`` LM-head kernel (``embedding.T`` for tied embeddings).
      labels: ``[B, T]`` int labels, unshifted (as for the plain loss).
      aux_losses: ``[L]`` per-layer auxiliary losses.
      aux_loss_coef: weight of ``sum(aux_losses)``.
      tile_size: tokens per tile (see ``tiled_cross_entropy``).

    Returns:
      ``{"loss", "ce_loss", "aux_loss"}`` scalars in the accumulation dtype (float32 unless float64 under x64).
    """
    if hidden.ndim != 3:
        raise ValueError(f"hidden must be [B, T, D], got {hidden.shape=}")
    if labels.shape != hidden.shape[:2]:
        raise ValueError(f"labels shape {labels.shape} != hidden batch/time shape {hidden.shape[:2]}")
    shifted = jnp.concatenate([labels[:, 1:], jnp.full_like(labels[:, :1], IGNORE_INDEX)], axis=1)  # [B, T]
    nll_sum, count = tiled_cross_entropy(hidden, head_kernel, shifted, tile_size=tile_size)
    ce = nll_sum / jnp.maximum(count, 1)
    aux = jnp.sum(aux_losses.astype(acc_dtype(hidden)))
    return {"loss": ce + aux_loss_coef * aux, "ce_loss": ce, "aux_loss": aux}
