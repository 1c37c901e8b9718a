"""One decoder block (HF ``SSESWAMoBABlock``): pre-norm token mixer and gated MLP, both residual."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from spb2_jax.config import LayerKind, SpB2Config
from spb2_jax.layers.attention import AttentionMixer
from spb2_jax.layers.cache import CacheStep
from spb2_jax.layers.common import Dtype, GatedMLP, RMSNorm
from spb2_jax.layers.sse_swa import SSESWAMixer
from spb2_jax.ops import dispatch
from spb2_jax.ops.dtypes import acc_dtype


class DecoderBlock(nn.Module):
    """``h = x + mixer(rms(x)); y = h + mlp(rms(h))``.

    Returns ``(y, mixer_output, aux_loss, cache)``; the mixer output is zero at padding tokens (segment 0), as in
    the official unpad/pad path. ``cache``: this layer's updated cache when one is given (decoding), else None.
    """

    config: SpB2Config
    layer_idx: int
    impl: str = dispatch.DEFAULT_IMPL
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, segment_ids: jax.Array, positions: jax.Array,
                 deterministic: bool = True, cache: Any = None,
                 step: CacheStep | None = None) -> tuple[jax.Array, jax.Array, jax.Array, Any]:
        c = self.config
        kind = c.layer_kind(self.layer_idx)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        mix_kw = dict(impl=self.impl, name="attn", **kw)
        h = RMSNorm(eps=c.norm_eps, name="attn_norm", **kw)(x)
        if kind in (LayerKind.FULL, LayerKind.MOBA):
            mixed, cache = AttentionMixer(c, kind, **mix_kw)(h, segment_ids, positions, cache, step)
            aux = jnp.zeros((), acc_dtype(x))
        else:
            mixed, aux, cache = SSESWAMixer(c, kind, **mix_kw)(h, segment_ids, positions, deterministic, cache, step)
        mixed = mixed * (segment_ids != 0)[..., None].astype(mixed.dtype)
        h = x + mixed
        m = RMSNorm(eps=c.norm_eps, name="mlp_norm", **kw)(h)
        y = h + GatedMLP(c.hidden_size, c.mlp_intermediate_size, c.initializer_range, name="mlp", **kw)(m)
        return y, mixed, aux, cache
