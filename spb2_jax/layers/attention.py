"""Softmax-attention token mixers: full causal attention and MoBA (HF ``Attention`` / ``MoBAAttention``)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from einops import rearrange

from spb2_jax.config import LayerKind, SpB2Config
from spb2_jax.layers.common import Dtype, RMSNorm, dense
from spb2_jax.ops import dispatch
from spb2_jax.ops.rope import apply_rope


class AttentionMixer(nn.Module):
    """GQA attention with optional per-head q/k RMSNorm and NeoX RoPE; ``kind`` is FULL or MOBA.

    Params (HF names): ``q_proj k_proj v_proj o_proj`` and, with ``attn.qk_norm``, ``q_norm k_norm``.
    """

    config: SpB2Config
    kind: str
    impl: str = dispatch.DEFAULT_IMPL
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, segment_ids: jax.Array, positions: jax.Array) -> jax.Array:
        c, a = self.config, self.config.attn
        H = c.head_dim
        kw = dict(use_bias=a.qkv_bias, dtype=self.dtype, param_dtype=self.param_dtype)
        std = c.initializer_range
        q = rearrange(dense(a.num_heads * H, "q_proj", std, **kw)(x), "B T (N H) -> B T N H", H=H)
        k = rearrange(dense(a.kv_heads * H, "k_proj", std, **kw)(x), "B T (K H) -> B T K H", H=H)
        v = rearrange(dense(a.kv_heads * H, "v_proj", std, **kw)(x), "B T (K H) -> B T K H", H=H)
        if a.qk_norm:
            norm_kw = dict(eps=c.norm_eps, dtype=self.dtype, param_dtype=self.param_dtype)
            q = RMSNorm(name="q_norm", **norm_kw)(q)
            k = RMSNorm(name="k_norm", **norm_kw)(k)
        q = apply_rope(q, positions, a.rope_theta)
        k = apply_rope(k, positions, a.rope_theta)
        if self.kind == LayerKind.MOBA:
            o = dispatch.moba(q, k, v, chunk_size=a.moba_chunk_size, topk=a.moba_topk, segment_ids=segment_ids,
                              impl=self.impl)
        elif self.kind == LayerKind.FULL:
            o = dispatch.full_attention(q, k, v, segment_ids=segment_ids, impl=self.impl)
        else:
            raise ValueError(f"AttentionMixer kind={self.kind!r} must be {LayerKind.FULL!r} or {LayerKind.MOBA!r}")
        o = rearrange(o, "B T N H -> B T (N H)")
        return dense(c.hidden_size, "o_proj", std, dtype=self.dtype, param_dtype=self.param_dtype)(o)
