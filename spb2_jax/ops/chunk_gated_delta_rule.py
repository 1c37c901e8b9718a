"""Chunkwise-parallel gated delta rule (WY / UT transform), linear in T in time and memory.

Inside a chunk of C tokens with state ``S0`` at its start, cumulative log decay ``G_t = sum_{s<=t} g_s`` and
``Gamma_t = exp(G_t)``, the per-token delta-rule updates ``u_t = beta_t (v_t - (exp(g_t) S_{t-1})^T k_t)`` solve
the unit lower-triangular system

    (I + diag(beta) A) U = diag(beta) V - diag(beta * Gamma) K S0,   A_ts = exp(G_t - G_s) k_t.k_s  (s < t)

and then ``O = diag(Gamma) Q S0 + (exp(G_t - G_s) [s <= t] * Q K^T) U`` and
``S_C = Gamma_C S0 + K^T diag(exp(G_C - G)) U``. The triangular system is solved with the explicit inverse
``(I + diag(beta) A)^-1`` from ``triangular.unit_lower_inverse`` (matmuls only); it and all statistics are float32;
across chunks a ``jax.lax.scan`` carries the float32 state ``[B, H, K, V]``.

Segments (``segment_ids``, 0 = padding): padding tokens are zeroed (k = q = beta = g = 0, exact no-ops);
tokens interact only within the same run (see ``segments.run_ids``), ``S0`` reaches only tokens of the run
that was open at the chunk start, so a boundary inside a chunk resets the state exactly like the reference.

Gradients: plain reverse-mode autodiff through the scan, with the chunk body under ``jax.checkpoint`` so the
backward pass stores only the per-chunk input state (``T / C`` states of ``[B, H, K, V]``) and rematerialises
each chunk's O(C^2) intermediates: memory stays linear in T.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from einops import rearrange

from spb2_jax.ops.dtypes import acc_dtype
from spb2_jax.ops.norms import l2_norm
from spb2_jax.ops.segments import chunk_runs, pad_time
from spb2_jax.ops.triangular import unit_lower_inverse


def chunk_gated_delta_rule(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    g: jax.Array,
    beta: jax.Array,
    *,
    scale: float | None = None,
    initial_state: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    chunk_size: int = 64,
    use_qk_l2norm: bool = True,
) -> tuple[jax.Array, jax.Array]:
    """Gated delta rule, chunked; same contract as ``gated_delta_rule_reference``.

    Args:
      q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]``; g: log decays ``[B, T, H]`` (<= 0); beta: ``[B, T, H]``
        (in (0, 2) with negative eigenvalues).
      scale: default ``K ** -0.5``. initial_state: ``[B, H, K, V]``. segment_ids: ``[B, T]``, 0 = padding.
      chunk_size: C; T need not be a multiple. use_qk_l2norm: L2-normalise q and k (eps 1e-6 in the sqrt).
    Returns:
      ``o [B, T, H, V]`` in ``v.dtype`` and the final state ``[B, H, K, V]`` (float32 or wider).
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    if k.shape != (B, T, H, K) or v.shape[:3] != (B, T, H) or g.shape != (B, T, H) or beta.shape != (B, T, H):
        raise ValueError(f"shape mismatch: q{q.shape} k{k.shape} v{v.shape} g{g.shape} beta{beta.shape}")
    if chunk_size <= 0:
        raise ValueError(f"{chunk_size=} must be positive")
    acc = acc_dtype(q, k, v, g, beta)
    scale = K ** -0.5 if scale is None else scale
    if segment_ids is None:
        segment_ids = jnp.ones((B, T), jnp.int32)
    real = (segment_ids != 0)[..., None]  # [B, T, 1]
    out_dtype = v.dtype
    q, k, v, g, beta = (x.astype(acc) for x in (q, k, v, g, beta))
    if use_qk_l2norm:
        q, k = l2_norm(q), l2_norm(k)
    q = jnp.where(real[..., None], q * scale, 0.0)
    k = jnp.where(real[..., None], k, 0.0)
    g = jnp.where(real, g, 0.0)
    beta = jnp.where(real, beta, 0.0)
    C = chunk_size
    q, k, v, g, beta = (pad_time(x, C) for x in (q, k, v, g, beta))
    to_chunks = lambda x: rearrange(x, "B (n C) H ... -> n B H C ...", C=C)  # noqa: E731
    xs = (to_chunks(q), to_chunks(k), to_chunks(v), to_chunks(g), to_chunks(beta)) + chunk_runs(segment_ids, C)
    S0 = jnp.zeros((B, H, K, V), acc) if initial_state is None else initial_state.astype(acc)
    S, o = jax.lax.scan(jax.checkpoint(_chunk_step, prevent_cse=False), S0, xs)
    o = rearrange(o, "n B H C V -> B (n C) H V")[:, :T]
    return o.astype(out_dtype), S


def _chunk_step(S, xs):
    """One chunk for all (batch, head): ``S [B, H, K, V]`` -> (state after the chunk, outputs ``[B, H, C, V]``)."""
    q, k, v, g, beta, runs, run_before = xs  # q, k [B,H,C,K]; v [B,H,C,V]; g, beta [B,H,C]; runs [B,C]
    C = q.shape[2]
    G = jnp.cumsum(g, axis=-1)  # [B, H, C]
    same = (runs[:, :, None] == runs[:, None, :])[:, None]  # [B, 1, C, C]
    incl = jnp.tril(jnp.ones((C, C), bool)) & same
    strict = jnp.tril(jnp.ones((C, C), bool), -1) & same
    diff = G[..., :, None] - G[..., None, :]  # [B, H, C, C] (t, s)
    decay_incl = jnp.where(incl, jnp.exp(jnp.where(incl, diff, 0.0)), 0.0)
    decay_strict = jnp.where(strict, decay_incl, 0.0)
    carried = (runs == run_before[:, None])[:, None]  # [B, 1, C]: still in the run that owns S
    gamma = jnp.where(carried, jnp.exp(G), 0.0)  # [B, H, C]
    A = decay_strict * jnp.einsum("BHtK,BHsK->BHts", k, k)
    L = jnp.eye(C, dtype=q.dtype) + beta[..., :, None] * A
    rhs = jnp.concatenate([beta[..., None] * v, (beta * gamma)[..., None] * k], axis=-1)  # [B, H, C, V + K]
    w = jnp.matmul(unit_lower_inverse(L), rhs, precision=jax.lax.Precision.HIGHEST)  # no LAPACK: triangular.py
    V = v.shape[-1]
    u = w[..., :V] - jnp.einsum("BHCK,BHKV->BHCV", w[..., V:], S)  # [B, H, C, V]
    o = jnp.einsum("BHCK,BHKV->BHCV", gamma[..., None] * q, S) + jnp.einsum(
        "BHts,BHsV->BHtV", decay_incl * jnp.einsum("BHtK,BHsK->BHts", q, k), u)
    last = (runs == runs[:, -1:])[:, None]  # [B, 1, C]: tokens of the run open at the chunk end
    tail = jnp.where(last, jnp.exp(G[..., -1:] - G), 0.0)  # [B, H, C]
    keep = jnp.where(carried[..., -1], jnp.exp(G[..., -1]), 0.0)  # [B, H]
    S = keep[..., None, None] * S + jnp.einsum("BHCK,BHCV->BHKV", tail[..., None] * k, u)
    return S, o
