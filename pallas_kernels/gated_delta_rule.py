"""Chunked gated delta rule forward kernel (Pallas): one program per (batch row, head) walks the chunks in order,
keeping the float32 state ``[H, E]`` on chip.

Per chunk of C tokens (state ``S0`` at its start; notation of ``spb2_jax.ops.gdn_chunked``):

    G = cumsum(g),  decay_ts = exp(G_t - G_s) [s <= t, same run]
    W = (I + diag(beta) A)^-1,  A_ts = decay_ts k_t.k_s (s < t)        -- forward substitution, row by row
    U = W (diag(beta) V) - W (diag(beta Gamma) K) S0,   Gamma_t = exp(G_t) [t in the run that owns S0]
    O = diag(Gamma) Q S0 + (decay * Q K^T) U
    S = exp(G_C) [run unchanged] S0 + (K * tail)^T U,  tail_t = exp(G_C - G_t) [t in the last run]

The inputs are prepared by the caller exactly as for the XLA path (L2-normalised, scaled q, padding tokens
zeroed, T padded to a multiple of C, run ids from ``spb2_jax.ops.segments.chunk_runs``); the kernel does all
arithmetic in float32 (``Precision.HIGHEST`` dots: no TF32). The unit lower-triangular solve uses forward
substitution over the C rows with whole-tile masked updates (``X_i = e_i - A_i X``), which lowers on Triton
and in interpret mode alike. Only the forward pass is a kernel; ``spb2_jax.ops`` differentiates through the XLA
path with a custom VJP.

Shape letters: see ``spb2_jax.parallel.rules`` (N heads, H key head dim, E value head dim); the capital ``Q, K,
V, U, W, A, G, S`` of the formulas above are per-chunk matrices, decays and states, not shapes.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.gated_delta_rule_tpu import gated_delta_rule_fwd_tpu
from pallas_kernels.platform import check_target, triton_params

_HIGHEST = jax.lax.Precision.HIGHEST


def _dot(a, b, trans_a=False, trans_b=False):
    dims = (((0 if trans_a else a.ndim - 1,), (b.ndim - 1 if trans_b else 0,)), ((), ()))
    return jax.lax.dot_general(a, b, dims, precision=_HIGHEST, preferred_element_type=jnp.float32)


def _unit_lower_inverse(A):
    """``(I + A)^-1`` for strictly lower-triangular ``A [C, C]`` by forward substitution over the rows."""
    C = A.shape[0]
    row = jax.lax.broadcasted_iota(jnp.int32, (C, C), 0)
    col = jax.lax.broadcasted_iota(jnp.int32, (C, C), 1)
    eye = (row == col).astype(A.dtype)

    def substitute(i, X):  # rows < i of X are final; X_i = e_i - sum_{j < i} A_ij X_j
        a_i = jnp.sum(jnp.where(row == i, A, 0.0), axis=0)  # [C] (zero for j >= i)
        x_i = jnp.sum(jnp.where(row == i, eye, 0.0), axis=0) - jnp.sum(a_i[:, None] * X, axis=0)
        return jnp.where(row == i, x_i[None, :], X)

    return jax.lax.fori_loop(1, C, substitute, eye)


def _gdn_kernel(q_ref, k_ref, v_ref, g_ref, beta_ref, runs_ref, before_ref, h0_ref, o_ref, ht_ref, *, chunk):
    C = chunk
    n_chunks = q_ref.shape[0] // C
    t = jax.lax.broadcasted_iota(jnp.int32, (C, C), 0)
    s = jax.lax.broadcasted_iota(jnp.int32, (C, C), 1)

    def step(c, S):
        sl = pl.ds(pl.multiple_of(c * C, C), C)
        q, k, v = q_ref[sl, :], k_ref[sl, :], v_ref[sl, :]  # [C, H], [C, H], [C, E]
        g, beta, runs = g_ref[sl], beta_ref[sl], runs_ref[sl]  # [C]
        G = jnp.sum(jnp.where(s <= t, g[None, :], 0.0), axis=1)  # inclusive cumsum, [C]
        same = runs[:, None] == runs[None, :]
        incl = (s <= t) & same
        decay = jnp.where(incl, jnp.exp(jnp.where(incl, G[:, None] - G[None, :], 0.0)), 0.0)
        carried = runs == before_ref[c]
        gamma = jnp.where(carried, jnp.exp(G), 0.0)
        A = jnp.where(s < t, beta[:, None] * decay * _dot(k, k, trans_b=True), 0.0)
        W = _unit_lower_inverse(A)
        w_v = _dot(W, beta[:, None] * v)
        w_k = _dot(W, (beta * gamma)[:, None] * k)
        u = w_v - _dot(w_k, S)
        o = _dot(gamma[:, None] * q, S) + _dot(decay * _dot(q, k, trans_b=True), u)
        o_ref[sl, :] = o.astype(o_ref.dtype)
        at_end = jnp.arange(C) == C - 1  # element C-1 by a masked sum: Triton cannot index a loaded array
        run_last = jnp.sum(jnp.where(at_end, runs, 0))
        G_last = jnp.sum(jnp.where(at_end, G, 0.0))
        tail = jnp.where(runs == run_last, jnp.exp(G_last - G), 0.0)
        keep = jnp.where(run_last == before_ref[c], jnp.exp(G_last), 0.0)
        return keep * S + _dot(tail[:, None] * k, u, trans_a=True)

    ht_ref[...] = jax.lax.fori_loop(0, n_chunks, step, h0_ref[...].astype(jnp.float32))


def gated_delta_rule_fwd(q, k, v, g, beta, runs, run_before, initial_state, *, chunk_size: int,
                         interpret: bool, target: str):
    """Forward of the chunked gated delta rule on prepared inputs.

    Args:
      q, k: ``[B, T, N, H]`` float32 (q already scaled, both normalised if wanted, padding zeroed);
      v: ``[B, T, N, E]`` float32; g, beta: ``[B, T, N]`` float32 (padding: 0); ``T % chunk_size == 0``.
      runs: ``[B, T]`` int32 state-run id of every token; run_before: ``[B, T // C]`` run owning each chunk's
        incoming state (``spb2_jax.ops.segments.chunk_runs`` laid out as ``[B, ...]``).
      initial_state: ``[B, N, H, E]`` float32.
      chunk_size: C. interpret: run the kernel in interpret mode (True on CPU; a ``pltpu.InterpretParams`` for
        jax's TPU simulator). target: ``"triton"`` (this module's kernel, GPU style) or ``"mosaic_tpu"``
        (``gated_delta_rule_tpu``); ValueError otherwise.
    Returns:
      ``o [B, T, N, E]`` float32 and the final state ``[B, N, H, E]`` float32.
    """
    B, T, N, H = q.shape
    E = v.shape[-1]
    C = chunk_size
    if T % C:
        raise ValueError(f"{T=} must be a multiple of {chunk_size=}")
    if check_target(target) == "mosaic_tpu":
        return gated_delta_rule_fwd_tpu(q, k, v, g, beta, runs, run_before, initial_state, chunk_size=C,
                                        interpret=interpret)
    n = T // C
    seq = lambda d: pl.BlockSpec((None, T, None, d), lambda b, h: (b, 0, h, 0))  # noqa: E731
    gate = pl.BlockSpec((None, T, None), lambda b, h: (b, 0, h))
    state = pl.BlockSpec((None, None, H, E), lambda b, h: (b, h, 0, 0))
    return pl.pallas_call(
        functools.partial(_gdn_kernel, chunk=C),
        grid=(B, N),
        in_specs=[seq(H), seq(H), seq(E), gate, gate, pl.BlockSpec((None, T), lambda b, h: (b, 0)),
                  pl.BlockSpec((None, n), lambda b, h: (b, 0)), state],
        out_specs=[seq(E), state],
        out_shape=[jax.ShapeDtypeStruct((B, T, N, E), jnp.float32), jax.ShapeDtypeStruct((B, N, H, E), jnp.float32)],
        interpret=interpret,
        compiler_params=triton_params(interpret),
        name="chunk_gated_delta_rule_fwd",
    )(q, k, v, g, beta, runs, run_before, initial_state)
