"""SSE + sliding-window-attention hybrid token mixer (HF ``SSEGDNH`` / ``SSEGLAH``).

``out = (rms(sse, sse_merge_norm) + rms(swa, swa_merge_norm)) / 2``; in training (``deterministic=False``)
with probability ``swa_dropout`` the layer returns ``rms(sse, sse_merge_norm)`` alone. With an ``SSECache`` the
recurrences continue from the cached states and the SWA attends over the ring buffer plus the new tokens.

Shape letters: see ``spb2_jax.parallel.rules`` (N heads, K kv heads, H head dim, P SSE partitions).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from einops import rearrange

from spb2_jax.config import LayerKind, SpB2Config
from spb2_jax.layers.cache import CacheStep, SSECache
from spb2_jax.layers.common import RMSNorm, code_attention_inputs, dense, partitioned
from spb2_jax.ops import dispatch
from spb2_jax.ops.cached_attention import tiled_attention, window_key_mask
from spb2_jax.ops.dtypes import acc_dtype, round_bf16
from spb2_jax.ops.rope import rotate
from spb2_jax.ops.segments import Segments
from spb2_jax.ops.sse import sse_aux_loss, sse_gdn, sse_gla, sse_route
from spb2_jax.options import Kernels, ModelOptions
from spb2_jax.parallel import rules

_ONE_STEP = Kernels.resolve("reference")  # a single decoded token: one recurrence step, no chunk padding

GLA_GATE_RANK = 16
GLA_GATE_NORMALIZER = 16.0


def _a_log_init(key, shape, dtype):
    """Official init: ``A ~ U(0, 16)``, stored as ``log(A)``."""
    return jnp.log(jax.random.uniform(key, shape, jnp.float32, 0.0, 16.0)).astype(dtype)


def _dt_bias_init(key, shape, dtype):
    """Official init: ``dt ~ logU(1e-3, 1e-1)`` clamped at 1e-4, stored as ``softplus^-1(dt)``."""
    u = jax.random.uniform(key, shape, jnp.float32)
    dt = jnp.maximum(jnp.exp(u * (math.log(0.1) - math.log(0.001)) + math.log(0.001)), 1e-4)
    return (dt + jnp.log(-jnp.expm1(-dt))).astype(dtype)


class SSESWAMixer(nn.Module):
    """One SSE (GDN or GLA, per ``kind``) + SWA layer; returns ``(output [B, T, D], aux_loss [], cache)``
    (the updated ``SSECache``, or None without one)."""

    config: SpB2Config
    kind: str
    options: ModelOptions = ModelOptions()

    def _dense(self, features, name, axes, use_bias=False):
        o = self.options
        return dense(features, name, self.config.initializer_range, axes=axes, use_bias=use_bias,
                     dtype=o.dtype, param_dtype=o.param_dtype, coding=o.coding, spike_k=o.spike_k)

    def _norm(self, name, axis_name=rules.NORM):
        return RMSNorm(eps=self.config.norm_eps, dtype=self.options.dtype, param_dtype=self.options.param_dtype,
                       axis_name=axis_name, name=name)

    def _low_rank(self, x, name, rank, out, out_axis, out_bias=False):
        """HF ``nn.Sequential(Linear(D, rank), Linear(rank, out))`` as ``{name}_0``, ``{name}_1``."""
        inner = self._dense(rank, f"{name}_0", (rules.EMBED, rules.LOW_RANK))(x)
        return self._dense(out, f"{name}_1", (rules.LOW_RANK, out_axis), use_bias=out_bias)(inner)

    @nn.compact
    def __call__(self, x: jax.Array, segments: Segments, deterministic: bool = True, cache: SSECache | None = None,
                 step: CacheStep | None = None) -> tuple[jax.Array, jax.Array, SSECache | None]:
        c = self.config
        x = rules.constrain(x, rules.HIDDEN)
        if self.kind not in (LayerKind.SSE_GDN, LayerKind.SSE_GLA):
            raise ValueError(f"SSESWAMixer kind={self.kind!r} must be an SSE kind")
        is_gla = self.kind == LayerKind.SSE_GLA
        N, H, P = c.num_heads, c.head_dim, c.num_sparse_partition
        f32 = acc_dtype(x)
        heads = lambda t: rearrange(t, "B T (N H) -> B T N H", H=H)  # noqa: E731

        # ---- SSE projections ----
        qkv_bias = c.attn.qkv_bias if is_gla else False
        qh = (rules.EMBED, rules.Q_HEADS)
        q1 = self._dense(N * H, "sse_q_proj", qh, qkv_bias)(x)  # [B, T, N*H]
        k1 = self._dense(N * H, "sse_k_proj", qh, qkv_bias)(x)
        q2 = q1 + self._low_rank(x, "lora_q_proj", H, N * H, rules.Q_HEADS)
        k2 = k1 + self._low_rank(x, "lora_k_proj", H, N * H, rules.Q_HEADS)
        v = self._dense(N * H, "sse_v_proj", qh, qkv_bias)(x)
        q1, q2, k1, k2, v = map(heads, (q1, q2, k1, k2, v))  # [B, T, N, H]
        qk_act = nn.relu if c.sse_qk_relu else nn.silu
        q1, q2 = qk_act(q1), qk_act(q2)
        if is_gla:
            k1 = jax.nn.softmax(k1.astype(f32), axis=-1).astype(v.dtype)
            k2 = jax.nn.softmax(k2.astype(f32), axis=-1).astype(v.dtype)
        else:
            k1, k2 = qk_act(k1), qk_act(k2)
        v = nn.silu(v)
        q1, q2, k1, k2, v = (rules.constrain(t, rules.HEADS) for t in (q1, q2, k1, k2, v))
        router = self._dense(P, "sse_e_proj", (rules.EMBED, rules.PARTITIONS))(x)
        p, write, read = sse_route(router, c.num_writer, c.num_reader)  # [B, T, P]
        form = c.sse_implementation
        rec = dict(form=form, segment_ids=segments, kernels=self.options.kernels,
                   initial_state=None if cache is None else cache.state)
        if cache is not None and x.shape[1] == 1:
            rec["kernels"] = _ONE_STEP

        if is_gla:
            gk = jnp.stack([heads(self._low_rank(x, f"sse_gk_proj_{i}", GLA_GATE_RANK, N * H, rules.Q_HEADS,
                                                 out_bias=True))
                            for i in range(2)], axis=2)  # [B, T, 2, N, H]
            gk = jax.nn.log_sigmoid(gk.astype(f32)) / GLA_GATE_NORMALIZER
            sse_o, state = sse_gla(q1, k1, q2, k2, v, gk, p, write, read, **rec)
        else:
            gates = (rules.EMBED, rules.GATE_HEADS)
            beta = jax.nn.sigmoid(self._dense(2 * N, "sse_b_proj", gates)(x).astype(f32))  # [B, T, 2N]
            if c.allow_neg_eigval:
                beta = beta * 2.0
            pd = self.options.param_dtype
            a_log = self.param("A_log", partitioned(_a_log_init, rules.GATE_HEADS), (2 * N,), pd)
            dt_bias = self.param("dt_bias", partitioned(_dt_bias_init, rules.GATE_HEADS), (2 * N,), pd)
            a = self._dense(2 * N, "sse_a_proj", gates)(x).astype(f32)
            g = -jnp.exp(a_log.astype(f32)) * jax.nn.softplus(a + dt_bias.astype(f32))  # [B, T, 2N]
            two = lambda t: rearrange(t, "B T (two N) -> B T two N", two=2)  # noqa: E731
            sse_o, state = sse_gdn(q1, k1, q2, k2, v, two(g), two(beta), p, write, read, **rec)

        if c.use_output_gate:
            gate = heads(self._low_rank(x, "sse_g_proj", H, N * H, rules.Q_HEADS))
            sse_o = self._norm("sse_o_norm", rules.HEAD_DIM)(sse_o, gate)
        else:
            sse_o = self._norm("sse_o_norm", rules.HEAD_DIM)(sse_o)
        sse_o = rules.constrain(sse_o, rules.HEADS)
        sse_o = self._dense(c.hidden_size, "sse_o_proj", (rules.Q_HEADS, rules.EMBED))(
            rearrange(sse_o, "B T N H -> B T (N H)"))
        aux = sse_aux_loss(p, write, segments.real, c.num_writer)
        sse_out = self._norm("sse_merge_norm")(sse_o)

        # ---- sliding-window attention ----
        a = c.attn
        kvh = (rules.EMBED, rules.KV_HEADS)
        sq = rearrange(self._dense(N * H, "swa_q_proj", qh, a.qkv_bias)(x), "B T (N H) -> B T N H", H=H)
        sk = rearrange(self._dense(a.kv_heads * H, "swa_k_proj", kvh, a.qkv_bias)(x), "B T (K H) -> B T K H", H=H)
        sv = rearrange(self._dense(a.kv_heads * H, "swa_v_proj", kvh, a.qkv_bias)(x), "B T (K H) -> B T K H", H=H)
        if a.qk_norm:
            sq, sk = self._norm("swa_q_norm", rules.HEAD_DIM)(sq), self._norm("swa_k_norm", rules.HEAD_DIM)(sk)
        if self.options.official_qk_bf16:  # the official VL code's cast after the q / k norms
            sq, sk = round_bf16(sq), round_bf16(sk)
        sq, sk = rotate(sq, segments, a.rope_theta, c.mrope_section), rotate(sk, segments, a.rope_theta, c.mrope_section)
        sq, sk, sv = code_attention_inputs(self, sq, sk, sv, self.options.coding, self.options.spike_k)
        sq, sk, sv = rules.constrain(sq, rules.HEADS), rules.constrain(sk, rules.KV), rules.constrain(sv, rules.KV)
        if cache is None or step.fresh:
            swa_o = dispatch.window_attention(sq, sk, sv, window=a.window_size, segments=segments,
                                              kernels=self.options.kernels)
        else:
            swa_o = self._window_over_cache(sq, sk, sv, cache, step)
        if cache is not None:
            cache = cache.append(sk, sv, step, state)
        swa_o = rules.constrain(swa_o, rules.HEADS)
        swa_o = self._dense(c.hidden_size, "swa_o_proj", (rules.Q_HEADS, rules.EMBED))(
            rearrange(swa_o, "B T N H -> B T (N H)"))
        self.sow("intermediates", "swa_output", swa_o)  # the SWA branch alone (T2H checks; no-op unless mutable)
        out = (sse_out + self._norm("swa_merge_norm")(swa_o)) / 2

        if not deterministic and c.swa_dropout > 0:
            drop = jax.random.uniform(self.make_rng("dropout"), ()) < c.swa_dropout
            out = jnp.where(drop, sse_out, out)
        return rules.constrain(out, rules.HIDDEN), aux, cache

    def _window_over_cache(self, q, k, v, cache: SSECache, step: CacheStep) -> jax.Array:
        """SWA of the new queries over the ring buffer (earlier tokens) plus the new keys."""
        keys = jnp.concatenate([cache.k, k.astype(cache.k.dtype)], axis=1)
        values = jnp.concatenate([cache.v, v.astype(cache.v.dtype)], axis=1)
        kpos = jnp.concatenate([cache.pos, step.positions], axis=1)
        window = cache.window if self.config.attn.window_size is None else self.config.attn.window_size
        return tiled_attention(q, keys, values, lambda qt, pt: window_key_mask(pt, kpos, window), step.positions)
