"""Softmax-attention token mixers: full causal attention and MoBA (HF ``Attention`` / ``MoBAAttention``).

With a ``KVCache`` the mixer adds tokens to it (prefill piece or decode step) and attends over the cache: same
per-token semantics as the forward (``spb2_jax.ops.cached_attention``).

Shape letters: see ``spb2_jax.parallel.rules`` (N query heads, K kv heads, H head dim, S cache slots).
"""

from __future__ import annotations

import flax.linen as nn
import jax
from einops import rearrange

from spb2_jax.config import LayerKind, SpB2Config
from spb2_jax.layers.cache import CacheStep, KVCache
from spb2_jax.layers.common import RMSNorm, code_attention_inputs, dense
from spb2_jax.ops import dispatch
from spb2_jax.ops.cached_attention import (causal_slot_mask, moba_gathered_attention, moba_slot_mask,
                                           tiled_attention)
from spb2_jax.ops.dtypes import round_bf16
from spb2_jax.ops.rope import rotate
from spb2_jax.ops.segments import Segments
from spb2_jax.options import ModelOptions
from spb2_jax.parallel import rules, sequence


class AttentionMixer(nn.Module):
    """GQA attention with optional per-head q/k RMSNorm and NeoX RoPE; ``kind`` is FULL or MOBA.

    Params (HF names): ``q_proj k_proj v_proj o_proj`` and, with ``attn.qk_norm``, ``q_norm k_norm``.
    """

    config: SpB2Config
    kind: str
    options: ModelOptions = ModelOptions()

    @nn.compact
    def __call__(self, x: jax.Array, segments: Segments, cache: KVCache | None = None,
                 step: CacheStep | None = None) -> tuple[jax.Array, KVCache | None]:
        """``x [B, T, D]`` -> ``(output [B, T, D], updated cache or None)``; ``segments.positions`` are the RoPE
        positions. With ``cache`` and ``step``: the real tokens are added to the cache first."""
        c, a, o = self.config, self.config.attn, self.options
        H = c.head_dim
        kw = dict(use_bias=a.qkv_bias, dtype=o.dtype, param_dtype=o.param_dtype, coding=o.coding, spike_k=o.spike_k)
        std = c.initializer_range
        x = rules.constrain(x, rules.HIDDEN)
        q = dense(a.num_heads * H, "q_proj", std, axes=(rules.EMBED, rules.Q_HEADS), **kw)(x)
        k = dense(a.kv_heads * H, "k_proj", std, axes=(rules.EMBED, rules.KV_HEADS), **kw)(x)
        v = dense(a.kv_heads * H, "v_proj", std, axes=(rules.EMBED, rules.KV_HEADS), **kw)(x)
        q = rearrange(q, "B T (N H) -> B T N H", H=H)  # [B, T, N, H]
        k = rearrange(k, "B T (K H) -> B T K H", H=H)  # [B, T, K, H]
        v = rearrange(v, "B T (K H) -> B T K H", H=H)  # [B, T, K, H]
        if a.qk_norm:
            norm_kw = dict(eps=c.norm_eps, dtype=o.dtype, param_dtype=o.param_dtype, axis_name=rules.HEAD_DIM)
            q = RMSNorm(name="q_norm", **norm_kw)(q)
            k = RMSNorm(name="k_norm", **norm_kw)(k)
        if o.official_qk_bf16:  # the official VL code's cast (module docstring)
            q, k = round_bf16(q), round_bf16(k)
        q = rotate(q, segments, a.rope_theta, c.mrope_section)
        k = rotate(k, segments, a.rope_theta, c.mrope_section)
        q, k, v = code_attention_inputs(self, q, k, v, o.coding, o.spike_k)
        q, k, v = rules.constrain(q, rules.HEADS), rules.constrain(k, rules.KV), rules.constrain(v, rules.KV)
        if self.kind not in (LayerKind.FULL, LayerKind.MOBA):
            raise ValueError(f"AttentionMixer kind={self.kind!r} must be {LayerKind.FULL!r} or {LayerKind.MOBA!r}")
        if cache is not None:
            cache = cache.append(k, v, step, a.moba_chunk_size)
        if cache is None or step.fresh:
            out = self._attend_forward(q, k, v, segments)
        else:
            out = self._attend_cache(q, cache, step)
        out = rules.constrain(out, rules.HEADS)  # [B, T, N, H]
        out = rearrange(out, "B T N H -> B T (N H)")
        out = dense(c.hidden_size, "o_proj", std, axes=(rules.Q_HEADS, rules.EMBED), dtype=o.dtype,
                    param_dtype=o.param_dtype, coding=o.coding, spike_k=o.spike_k)(out)
        return rules.constrain(out, rules.HIDDEN), cache

    def _attend_forward(self, q, k, v, segments: Segments):
        """The forward's attention over the tokens of this call (also a fresh cache's first piece)."""
        a, kernels = self.config.attn, self.options.kernels
        if self.kind == LayerKind.MOBA:
            return dispatch.moba(q, k, v, chunk_size=a.moba_chunk_size, topk=a.moba_topk, segments=segments,
                                 kernels=kernels)
        return dispatch.full_attention(q, k, v, segments=segments, kernels=kernels)

    def _attend_cache(self, q, cache: KVCache, step: CacheStep):
        """New queries over the whole position-indexed cache (already holding the new keys)."""
        a = self.config.attn
        S = cache.k.shape[2]
        shards = self.options.kernels.sequence_shards
        if self.kind == LayerKind.MOBA and not step.moba_dense:
            if shards == 1 and q.shape[1] == 1 and a.moba_topk * a.moba_chunk_size < S:
                # decode: read only the selected blocks
                return moba_gathered_attention(q, cache.k, cache.v, step.positions, cache.block_sums,
                                               chunk_size=a.moba_chunk_size, topk=a.moba_topk)

            def mask_fn(qt, pt, slots=None):
                return moba_slot_mask(qt, pt, cache.block_sums, num_slots=S, chunk_size=a.moba_chunk_size,
                                      topk=a.moba_topk, slots=slots)
        else:
            def mask_fn(qt, pt, slots=None):
                return causal_slot_mask(pt, S, slots)
        if shards > 1:  # the cache is sharded along its slots: flash-decoding across the shards
            return sequence.cache_attention(q, cache.k, cache.v, mask_fn, step.positions, shards=shards)
        k, v = (rearrange(x, "B K S H -> B S K H") for x in (cache.k, cache.v))
        return tiled_attention(q, k, v, mask_fn, step.positions)
