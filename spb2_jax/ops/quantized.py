"""Quantised linear products (pure jnp): the FP8 path and the INT8-Spiking path of a linear layer.

FP8 (e4m3fn, largest finite value 448):

- weights, once (``quantize_fp8_weight``): per output channel ``s_w = amax(|w|) / 448`` (float32; 1 for an all-zero
  channel) and ``w_q = e4m3(w / s_w)`` stored ``[F, D]`` (output-major: both operands of the product are
  contracted along their last, minor dimension, the layout cuBLASLt's FP8 GEMM takes, so XLA inserts no
  transpose);
- activations, per token (``quantize_fp8_activation``): ``s_x = amax(|x|) / 448``, ``x_q = e4m3(x / s_x)``;
- ``y = dot_general(x_q, w_q, preferred_element_type=float32) * s_x * s_w``: the pattern XLA:GPU rewrites into a
  cuBLASLt FP8 GEMM on Hopper; on CPU the same dot runs upcast, exactly equal to
  ``(x_q.astype(f32) @ w_q.astype(f32).T) * s_x * s_w``.

INT8-Spiking (SpikingBrain's scheme; counts in ``spb2_jax.ops.spikes``):

- weights (``quantize_int8_weight``): symmetric INT8 per group of ``GROUP = 128`` input features and output
  channel, ``s_g = amax(|w_g|) / 127``, stored ``w_q [D, F]`` int8 and ``s [G, F]`` float32 (``G = ceil(D / 128)``;
  a last partial group is zero-padded in the product);
- activations: per token ``V_th = mean(|x|) / k`` and counts ``n = round(x / V_th)`` (int8, clipped at +-127);
- ``y = V_th * sum_g s_g * (n_g @ w_g)``, each ``n_g @ w_g`` an exact int32 product
  (``dot_general(int8, int8, preferred_element_type=int32)``), the group sum in float32;
- attention (``spiking_attention_inputs``, as SpikingBrain coded its SWA): queries spiked per token and head
  (``n_q * V_th``, threshold over the head dimension), keys and values symmetric INT8 per token and head
  (``s = amax / 127``); softmax attention then runs on these values, so ``q . k = V_th s_k (n_q . k_q)`` is the
  integer product up to float32 rounding, and a cache holds exactly the coded keys and values.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from spb2_jax.ops.spikes import spike_counts

FP8 = jnp.float8_e4m3fn
FP8_MAX = 448.0
INT8_MAX = 127
GROUP = 128


def _scale(amax: jax.Array, top: float) -> jax.Array:
    return jnp.where(amax > 0, amax / top, 1.0).astype(jnp.float32)


def quantize_fp8_weight(kernel: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Flax kernel ``[D, F]`` -> ``(w_q [F, D] float8_e4m3fn, s_w [F] float32)`` (per output channel)."""
    w = kernel.astype(jnp.float32).T  # [F, D]
    scale = _scale(jnp.max(jnp.abs(w), axis=1), FP8_MAX)  # [F]
    return jnp.clip(w / scale[:, None], -FP8_MAX, FP8_MAX).astype(FP8), scale


def quantize_fp8_activation(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``x [..., D]`` -> ``(x_q [..., D] float8_e4m3fn, s_x [..., 1] float32)`` (per token)."""
    x = x.astype(jnp.float32)
    scale = _scale(jnp.max(jnp.abs(x), axis=-1, keepdims=True), FP8_MAX)
    return jnp.clip(x / scale, -FP8_MAX, FP8_MAX).astype(FP8), scale


def fp8_matmul(x_q: jax.Array, s_x: jax.Array, w_q: jax.Array, s_w: jax.Array) -> jax.Array:
    """``(x_q @ w_q^T) * s_x * s_w`` float32 ``[..., F]``: one FP8 ``dot_general`` (float32 accumulation), the
    scales applied after."""
    dims = (((x_q.ndim - 1,), (1,)), ((), ()))
    return jax.lax.dot_general(x_q, w_q, dims, preferred_element_type=jnp.float32) * s_x * s_w


def fp8_linear(x: jax.Array, w_q: jax.Array, s_w: jax.Array) -> jax.Array:
    """``x [..., D]`` through an FP8 weight (``quantize_fp8_weight``): float32 ``[..., F]``."""
    x_q, s_x = quantize_fp8_activation(x)
    return fp8_matmul(x_q, s_x, w_q, s_w)


def quantize_int8_weight(kernel: jax.Array, group: int = GROUP) -> tuple[jax.Array, jax.Array]:
    """Flax kernel ``[D, F]`` -> ``(w_q [D, F] int8, s [G, F] float32)``: symmetric per group of ``group`` input
    features and output channel."""
    D, F = kernel.shape
    G = -(-D // group)
    w = jnp.pad(kernel.astype(jnp.float32), ((0, G * group - D), (0, 0))).reshape(G, group, F)
    scale = _scale(jnp.max(jnp.abs(w), axis=1), INT8_MAX)  # [G, F]
    q = jnp.clip(jnp.round(w / scale[:, None, :]), -INT8_MAX, INT8_MAX).astype(jnp.int8)
    return q.reshape(G * group, F)[:D], scale


def group_products(n: jax.Array, w_q: jax.Array, group: int = GROUP) -> jax.Array:
    """Exact int32 ``n_g @ w_g`` per input group: ``n [M, D]`` int8, ``w_q [D, F]`` int8 -> ``[G, M, F]``."""
    (M, D), F = n.shape, w_q.shape[1]
    G = -(-D // group)
    pad = G * group - D
    ng = jnp.pad(n, ((0, 0), (0, pad))).reshape(M, G, group)
    wg = jnp.pad(w_q, ((0, pad), (0, 0))).reshape(G, group, F)
    return jax.lax.dot_general(ng, wg, (((2,), (1,)), ((1,), (0,))), preferred_element_type=jnp.int32)


def spiking_from_counts(n: jax.Array, v_th: jax.Array, w_q: jax.Array, scale: jax.Array,
                        group: int = GROUP) -> jax.Array:
    """``V_th * sum_g s_g (n_g @ w_g)`` float32 ``[..., F]`` from counts ``n [..., D]`` int8 and ``v_th [..., 1]``."""
    lead = n.shape[:-1]
    prod = group_products(n.reshape(-1, n.shape[-1]), w_q, group).astype(jnp.float32)  # [G, M, F]
    y = jnp.sum(prod * scale[:, None, :], axis=0) * v_th.reshape(-1, 1)  # [M, F]
    return y.reshape(lead + (w_q.shape[1],))


def quantize_int8_rows(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``x [..., H]`` -> ``(x_q [..., H] int8, s [..., 1] float32)``: symmetric INT8 per row (``s = amax / 127``)."""
    x = x.astype(jnp.float32)
    scale = _scale(jnp.max(jnp.abs(x), axis=-1, keepdims=True), INT8_MAX)
    return jnp.clip(jnp.round(x / scale), -INT8_MAX, INT8_MAX).astype(jnp.int8), scale


def spiking_attention_inputs(q: jax.Array, k: jax.Array, v: jax.Array, spike_k: float = 3.0):
    """The INT8-Spiking attention operands (module docstring) for ``q [B, T, N, H]``, ``k, v [B, T, K, H]``:
    ``(q_coded, k_coded, v_coded, (n_q, v_th))``, each coded operand in its input's dtype; ``n_q`` int8 and
    ``v_th [B, T, N, 1]`` are the query's counts and thresholds (for statistics)."""
    n, v_th = spike_counts(q, spike_k)
    coded_q = (n.astype(jnp.float32) * v_th).astype(q.dtype)

    def rows(x):
        x_q, s = quantize_int8_rows(x)
        return (x_q.astype(jnp.float32) * s).astype(x.dtype)

    return coded_q, rows(k), rows(v), (n, v_th)


def spiking_linear(x: jax.Array, w_q: jax.Array, scale: jax.Array, k: float = 3.0,
                   group: int = GROUP) -> jax.Array:
    """``x [..., D]`` through an INT8 weight (``quantize_int8_weight``) with spike-count activations:
    ``V_th * sum_g s_g (n_g @ w_g)`` float32 ``[..., F]``."""
    n, v_th = spike_counts(x, k)
    return spiking_from_counts(n, v_th, w_q, scale, group)
