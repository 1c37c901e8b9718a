"""Chunkwise-parallel gated linear attention with per-key log gates, linear in T in time and memory.

In a chunk with state ``S0`` at its start and cumulative log gates ``b_t = sum_{s<=t} gk_s`` (per key dim):

    o_t = (q_t * exp(b_t))^T S0 + sum_{s<=t} [sum_k q_tk k_sk exp(b_tk - b_sk)] v_s
    S_C = exp(b_C)[:, None] * S0 + sum_s (k_s * exp(b_C - b_s)) v_s^T

Every exponent is a difference ``b_t - b_s`` with ``s <= t`` (masked *before* ``exp``), hence <= 0: no
overflow for arbitrarily strong decays (gk = -20 per token underflows harmlessly to 0). The intra-chunk
``[C, C, K]`` decay tensor is built one chunk at a time inside the ``lax.scan``.

Segments, padding and gradients: as ``chunk_gated_delta_rule`` (runs, transparent padding, per-chunk
``jax.checkpoint`` so the backward stores only the per-chunk states: memory linear in T).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from einops import rearrange

from spb2_jax.ops.dtypes import acc_dtype
from spb2_jax.ops.segments import Segments, as_segments, chunk_runs, pad_time


def chunk_gla(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    gk: jax.Array,
    *,
    scale: float | None = None,
    initial_state: jax.Array | None = None,
    segment_ids: Segments | jax.Array | None = None,
    chunk_size: int = 64,
) -> tuple[jax.Array, jax.Array]:
    """GLA, chunked; same contract as ``gla_reference``.

    Args:
      q, k, gk: ``[B, T, H, K]`` (gk = log gates <= 0); v: ``[B, T, H, V]``; scale: default ``K ** -0.5``.
      initial_state: ``[B, H, K, V]``; segment_ids: ``[B, T]`` ids (0 = padding) or a ``Segments``;
      chunk_size: C (any T).
    Returns:
      ``o [B, T, H, V]`` in ``v.dtype`` and the final state ``[B, H, K, V]`` (float32 or wider).
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    if k.shape != (B, T, H, K) or gk.shape != (B, T, H, K) or v.shape[:3] != (B, T, H):
        raise ValueError(f"shape mismatch: q{q.shape} k{k.shape} v{v.shape} gk{gk.shape}")
    if chunk_size <= 0:
        raise ValueError(f"{chunk_size=} must be positive")
    acc = acc_dtype(q, k, v, gk)
    scale = K ** -0.5 if scale is None else scale
    seg = as_segments(segment_ids, B, T)
    real = seg.real[..., None, None]  # [B, T, 1, 1]
    q = jnp.where(real, q.astype(acc) * scale, 0.0)
    k = jnp.where(real, k.astype(acc), 0.0)
    gk = jnp.where(real, gk.astype(acc), 0.0)
    out_dtype = v.dtype
    v = v.astype(acc)
    C = chunk_size
    q, k, v, gk = (pad_time(x, C) for x in (q, k, v, gk))
    to_chunks = lambda x: rearrange(x, "B (n C) H ... -> n B H C ...", C=C)  # noqa: E731
    xs = (to_chunks(q), to_chunks(k), to_chunks(v), to_chunks(gk)) + chunk_runs(seg.labels, C)
    S0 = jnp.zeros((B, H, K, V), acc) if initial_state is None else initial_state.astype(acc)
    S, o = jax.lax.scan(jax.checkpoint(_chunk_step, prevent_cse=False), S0, xs)
    o = rearrange(o, "n B H C V -> B (n C) H V")[:, :T]
    return o.astype(out_dtype), S


def _chunk_step(S, xs):
    """One chunk for all (batch, head): ``S [B, H, K, V]`` -> (state after the chunk, outputs ``[B, H, C, V]``)."""
    q, k, v, gk, runs, run_before = xs  # q, k, gk [B,H,C,K]; v [B,H,C,V]; runs [B,C]; run_before [B]
    C = q.shape[2]
    b = jnp.cumsum(gk, axis=2)  # [B, H, C, K]
    same = (runs[:, :, None] == runs[:, None, :])[:, None]  # [B, 1, C, C]
    incl = (jnp.tril(jnp.ones((C, C), bool)) & same)[..., None]  # [B, 1, C, C, 1]
    diff = b[:, :, :, None, :] - b[:, :, None, :, :]  # [B, H, t, s, K]
    decay = jnp.where(incl, jnp.exp(jnp.where(incl, diff, 0.0)), 0.0)
    P = jnp.einsum("BHtK,BHsK,BHtsK->BHts", q, k, decay)
    carried = (runs == run_before[:, None])[:, None, :, None]  # [B, 1, C, 1]
    q_in = jnp.where(carried, q * jnp.exp(b), 0.0)
    # inter- and intra-chunk terms as ONE dot, [q_in | P] @ [S; v]: with two dots, a state that XLA knows to be
    # zero (no initial_state and a single chunk, so the scan is inlined) is a broadcast fed straight to a dot
    # next to P's reduction, which XLA:CPU's YNNPACK fusion miscompiles (tools/ynn_miscompile_repro.py)
    o = jnp.einsum("BHCJ,BHJV->BHCV", jnp.concatenate([q_in, P], axis=-1),  # J = K + C
                   jnp.concatenate([S, v], axis=-2))
    last = (runs == runs[:, -1:])[:, None, :, None]  # [B, 1, C, 1]
    k_out = jnp.where(last, k * jnp.exp(b[:, :, -1:] - b), 0.0)
    keep = jnp.where(carried[:, :, -1], jnp.exp(b[:, :, -1]), 0.0)  # [B, H, K]
    S = keep[..., None] * S + jnp.einsum("BHCK,BHCV->BHKV", k_out, v)
    return S, o
