"""Building blocks shared by the layers: RMSNorm, dense projections, the gated MLP."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from spb2_jax.ops.norms import gated_rms_norm, rms_norm

Dtype = Any


class RMSNorm(nn.Module):
    """RMSNorm over the last axis, float32 statistics; param ``scale`` <-> HF ``weight``."""

    eps: float = 1e-6
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, gate: jax.Array | None = None) -> jax.Array:
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
        if gate is None:
            return rms_norm(x, scale, self.eps).astype(self.dtype)
        return gated_rms_norm(x, gate, scale, self.eps).astype(self.dtype)


def dense(features: int, name: str, cfg_init_std: float, *, use_bias: bool = False, dtype: Dtype = jnp.float32,
          param_dtype: Dtype = jnp.float32) -> nn.Dense:
    """``nn.Dense`` named like the HF linear layer (kernel = HF weight transposed), N(0, std) init."""
    return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, name=name,
                    kernel_init=nn.initializers.normal(cfg_init_std), bias_init=nn.initializers.zeros)


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
        gate = dense(self.intermediate_size, "gate_proj", self.init_std, **kw)(x)  # [B, T, F]
        up = dense(self.intermediate_size, "up_proj", self.init_std, **kw)(x)  # [B, T, F]
        return dense(self.hidden_size, "down_proj", self.init_std, **kw)(nn.silu(gate) * up)  # [B, T, D]
