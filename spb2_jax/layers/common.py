"""Building blocks shared by the layers: RMSNorm, the one ``dense()`` constructor, the gated MLP.

Every parameter carries logical axis names (``nn.with_logical_partitioning``; the names and the rules table
that maps them to mesh axes are in ``spb2_jax.parallel.rules``). ``init`` therefore returns boxed
(``nn.LogicallyPartitioned``) leaves; ``spb2_jax.model.init_params`` unboxes them, and ``apply`` takes plain
arrays.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from spb2_jax.ops.norms import gated_rms_norm, rms_norm
from spb2_jax.ops.quantized import FP8, GROUP, fp8_linear, spiking_attention_inputs, spiking_from_counts
from spb2_jax.ops.spikes import count_stats, spike_counts
from spb2_jax.parallel import rules

Dtype = Any


def partitioned(init, *names: str):
    """``init`` whose parameter carries the logical axis ``names`` (one per dimension)."""
    return nn.with_logical_partitioning(init, names)


class RMSNorm(nn.Module):
    """RMSNorm over the last axis, float32 statistics; param ``scale`` <-> HF ``weight``.

    ``axis_name``: logical name of the normalised axis (``norm`` for D, ``head_dim`` for per-head norms)."""

    eps: float = 1e-6
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    axis_name: str = rules.NORM

    @nn.compact
    def __call__(self, x: jax.Array, gate: jax.Array | None = None) -> jax.Array:
        scale = self.param("scale", partitioned(nn.initializers.ones, self.axis_name), (x.shape[-1],),
                           self.param_dtype)
        if gate is None:
            return rms_norm(x, scale, self.eps).astype(self.dtype)
        return gated_rms_norm(x, gate, scale, self.eps).astype(self.dtype)


QUANT_EXEMPT = ("sse_a_proj", "sse_b_proj", "sse_e_proj")  # kept in the compute dtype, as the official vLLM plugin


def dense(features: int, name: str, cfg_init_std: float, *, axes: tuple[str, str], use_bias: bool = False,
          dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32, coding: str = "none",
          spike_k: float = 3.0) -> nn.Module:
    """``nn.Dense`` named like the HF linear layer (kernel = HF weight transposed), N(0, std) init; the kernel's
    logical axes are ``axes = (input axis, output axis)``, the bias's ``(output axis,)``. With ``coding`` ``"fp8"``
    or ``"int8_spiking"`` (and a name not in ``QUANT_EXEMPT``): a ``QuantDense`` of the same name reading the
    params ``spb2_jax.quant.quantize`` made."""
    if coding != "none" and name not in QUANT_EXEMPT:
        return QuantDense(features, coding=coding, spike_k=spike_k, use_bias=use_bias, axes=axes, dtype=dtype,
                          name=name)
    return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, name=name,
                    kernel_init=partitioned(nn.initializers.normal(cfg_init_std), *axes),
                    bias_init=partitioned(nn.initializers.zeros, axes[1]))


def code_attention_inputs(module: nn.Module, q: jax.Array, k: jax.Array, v: jax.Array, coding: str,
                          spike_k: float) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Softmax-attention operands under ``coding``: unchanged unless ``"int8_spiking"``, where the queries are
    spiked per token and head and the keys / values INT8 per token and head
    (``spb2_jax.ops.quantized.spiking_attention_inputs``); ``module`` sows the query counts' statistics as
    ``intermediates/.../query_spike_stats`` (no output change)."""
    if coding != "int8_spiking":
        return q, k, v
    coded_q, k, v, (n, v_th) = spiking_attention_inputs(q, k, v, spike_k)
    module.sow("intermediates", "query_spike_stats", count_stats(n, q, v_th))
    return coded_q, k, v


class QuantDense(nn.Module):
    """A linear layer on quantised params (``spb2_jax.ops.quantized``): ``fp8``: ``kernel [F, D]`` float8_e4m3fn and
    ``scale [F]``; ``int8_spiking``: ``kernel [D, F]`` int8 and ``scale [G, F]`` (groups of 128 inputs); an
    optional float32 ``bias [F]``. The spiking path sows its input's count statistics
    (``spb2_jax.ops.spikes.count_stats``) as ``intermediates/.../spike_stats`` without changing the output. Output in ``dtype``. Initialising one gives zero weights: quantise trained
    params instead (``spb2_jax.quant.quantize``)."""

    features: int
    coding: str
    spike_k: float = 3.0
    use_bias: bool = False
    axes: tuple[str, str] = ("embed", "mlp")
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        D, F = x.shape[-1], self.features
        zeros = lambda dtype: lambda key, shape: jnp.zeros(shape, dtype)  # noqa: E731
        ones = lambda key, shape: jnp.ones(shape, jnp.float32)  # noqa: E731
        if self.coding == "fp8":
            kernel = self.param("kernel", partitioned(zeros(FP8), self.axes[1], self.axes[0]), (F, D))
            scale = self.param("scale", partitioned(ones, self.axes[1]), (F,))
            y = fp8_linear(x, kernel, scale)
        elif self.coding == "int8_spiking":
            kernel = self.param("kernel", partitioned(zeros(jnp.int8), *self.axes), (D, F))
            scale = self.param("scale", partitioned(ones, None, self.axes[1]), (-(-D // GROUP), F))
            n, v_th = spike_counts(x, self.spike_k)
            self.sow("intermediates", "spike_stats", count_stats(n, x, v_th))  # no-op unless asked for
            y = spiking_from_counts(n, v_th, kernel, scale)
        else:
            raise ValueError(f"QuantDense coding={self.coding!r} must be 'fp8' or 'int8_spiking'")
        if self.use_bias:
            y = y + self.param("bias", partitioned(zeros(jnp.float32), self.axes[1]), (F,))
        return y.astype(self.dtype)


class GatedMLP(nn.Module):
    """``down(silu(gate(x)) * up(x))`` (fla GatedMLP with swish)."""

    hidden_size: int
    intermediate_size: int
    init_std: float = 0.02
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    coding: str = "none"
    spike_k: float = 3.0

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, coding=self.coding, spike_k=self.spike_k)
        up_axes, down_axes = (rules.EMBED, rules.MLP), (rules.MLP, rules.EMBED)
        gate = dense(self.intermediate_size, "gate_proj", self.init_std, axes=up_axes, **kw)(x)  # [B, T, F]
        up = dense(self.intermediate_size, "up_proj", self.init_std, axes=up_axes, **kw)(x)  # [B, T, F]
        return dense(self.hidden_size, "down_proj", self.init_std, axes=down_axes, **kw)(nn.silu(gate) * up)  # [B, T, D]
