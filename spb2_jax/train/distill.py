"""Distillation losses of the T2H pipeline: the teacher's next-token distribution (KL) and its attention outputs
(alignment), for ``spb2_jax.train.step`` when the run has a ``distill.teacher``.

KL at temperature ``tau`` (Hinton et al.), per target token, scaled by ``tau^2`` so that its gradient does not
shrink with the temperature::

    kl = tau^2 * sum_v p_t(v) (log p_t(v) - log p_s(v)),   p = softmax(logits / tau)

computed one sequence tile at a time from the two models' final normed hidden states and LM-head kernels: a tile
holds ``[B, C, V]`` logits of each model, never ``[B, T, V]``; the tile body is rematerialised
(``jax.checkpoint``), so the backward recomputes a tile's logits instead of keeping them. (Autodiff of the tile
scan adds each tile's ``[D, V]`` student head gradient to one accumulator; at 5B scale that is one extra
``[D, V]`` float32 array, 1.6 GB.) Softmax statistics are float32.

Alignment: the mean squared difference between the student's and the teacher's token-mixer outputs (the
official blocks' ``attentions``), averaged over hidden units and the aligned layers (every layer whose kind
is not full attention), summed over real tokens.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from spb2_jax.config import LayerKind, SpB2Config
from spb2_jax.loss import _tiles
from spb2_jax.ops.dtypes import acc_dtype


def tiled_kl(student_hidden: jax.Array, student_kernel: jax.Array, teacher_hidden: jax.Array,
             teacher_kernel: jax.Array, mask: jax.Array, *, temperature: float = 1.0,
             tile_size: int = 512) -> jax.Array:
    """``sum over tokens where mask`` of ``tau^2 KL(softmax(t / tau) || softmax(s / tau))`` (float32 scalar;
    float64 under x64 with float64 inputs),
    with ``s = student_hidden @ student_kernel`` and ``t = teacher_hidden @ teacher_kernel`` (module docstring).

    Args:
      student_hidden, teacher_hidden: ``[B, T, D_s]``, ``[B, T, D_t]`` final normed hidden states (compute
        dtype; the logits are computed in it, as the models' heads do).
      student_kernel, teacher_kernel: ``[D_s, V]``, ``[D_t, V]`` LM-head kernels.
      mask: ``[B, T]`` bool, the tokens that count.
      temperature: ``tau > 0``.
      tile_size: tokens per tile (T need not be a multiple).
    Differentiable w.r.t. every input (the caller stops the teacher's gradient).
    """
    B, T, _ = student_hidden.shape
    if teacher_hidden.shape[:2] != (B, T) or mask.shape != (B, T):
        raise ValueError(f"student hidden {student_hidden.shape}, teacher hidden {teacher_hidden.shape} and mask "
                         f"{mask.shape} must share [B, T]")
    if student_kernel.shape[1] != teacher_kernel.shape[1]:
        raise ValueError(f"student vocabulary {student_kernel.shape[1]} != teacher vocabulary "
                         f"{teacher_kernel.shape[1]}")
    if not temperature > 0:
        raise ValueError(f"temperature={temperature} must be > 0")
    C, n = _tiles(T, tile_size)
    pad = n * C - T

    def tiles(x, fill=0):
        x = jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2), constant_values=fill)
        return jnp.moveaxis(x.reshape((B, n, C) + x.shape[2:]), 1, 0)  # [n, B, C, ...]

    acc = acc_dtype(student_hidden)  # float32 (float64 under x64 with float64 inputs)
    ks = student_kernel.astype(student_hidden.dtype)
    kt = teacher_kernel.astype(teacher_hidden.dtype)

    @jax.checkpoint
    def tile_kl(hs, ht, m):
        zs = jax.lax.dot_general(hs, ks, (((2,), (0,)), ((), ()))).astype(acc) / temperature
        zt = jax.lax.dot_general(ht, kt, (((2,), (0,)), ((), ()))).astype(acc) / temperature
        log_s, log_t = jax.nn.log_softmax(zs, axis=-1), jax.nn.log_softmax(zt, axis=-1)  # [B, C, V]
        kl = jnp.sum(jnp.exp(log_t) * (log_t - log_s), axis=-1)  # [B, C]
        return jnp.sum(jnp.where(m, kl, 0.0))

    def body(total, xs):
        return total + tile_kl(*xs), None

    xs = (tiles(student_hidden), tiles(teacher_hidden), tiles(mask, False))
    total, _ = jax.lax.scan(body, jnp.zeros((), acc), xs)
    return (temperature ** 2) * total


def aligned_layers(config: SpB2Config) -> tuple[int, ...]:
    """The layers whose token mixer is not the teacher's full attention (MoBA and SSE layers)."""
    return tuple(i for i, k in enumerate(config.layer_kinds) if k != LayerKind.FULL)


def alignment_sum(student_mixers: Sequence[jax.Array], teacher_mixers: Sequence[jax.Array],
                  layers: Sequence[int], real: jax.Array) -> jax.Array:
    """``sum over real tokens`` of the squared mixer-output difference averaged over hidden units and ``layers``
    (float32 scalar; module docstring). ``real``: ``[B, T]`` bool."""
    if not layers:
        return jnp.float32(0)
    per_token = sum(jnp.mean(jnp.square(student_mixers[i].astype(jnp.float32)
                                        - teacher_mixers[i].astype(jnp.float32)), axis=-1) for i in layers)
    return jnp.sum(jnp.where(real, per_token / len(layers), 0.0))
