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


def dense(features: int, name: str, cfg_init_std: float, *, axes: tuple[str, str], use_bias: bool = False,
          dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32) -> nn.Dense:
    """``nn.Dense`` named like the HF linear layer (kernel = HF weight transposed), N(0, std) init; the kernel's
    logical axes are ``axes = (input axis, output axis)``, the bias's ``(output axis,)``."""
    return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, name=name,
                    kernel_init=partitioned(nn.initializers.normal(cfg_init_std), *axes),
                    bias_init=partitioned(nn.initializers.zeros, axes[1]))


class GatedMLP(nn.Module):
    """``down(silu(gate(x)) * up(x))`` (fla GatedMLP with swish)."""

    hidden_size: int
    intermediate_size: int
    init_std: float = 0.02
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        up_axes, down_axes = (rules.EMBED, rules.MLP), (rules.MLP, rules.EMBED)
        gate = dense(self.intermediate_size, "gate_proj", self.init_std, axes=up_axes, **kw)(x)  # [B, T, F]
        up = dense(self.intermediate_size, "up_proj", self.init_std, axes=up_axes, **kw)(x)  # [B, T, F]
        return dense(self.hidden_size, "down_proj", self.init_std, axes=down_axes, **kw)(nn.silu(gate) * up)  # [B, T, D]
