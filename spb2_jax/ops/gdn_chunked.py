"""Chunkwise-parallel gated delta rule (WY / UT transform), linear in T in time and memory.

Inside a chunk of C tokens with state ``S0`` at its start, cumulative log decay ``G_t = sum_{s<=t} g_s`` and
``Gamma_t = exp(G_t)``, the per-token delta-rule updates ``u_t = beta_t (v_t - (exp(g_t) S_{t-1})^T k_t)`` solve
the unit lower-triangular system

    (I + diag(beta) A) U = diag(beta) V - diag(beta * Gamma) K S0,   A_ts = exp(G_t - G_s) k_t.k_s  (s < t)

and then ``O = diag(Gamma) Q S0 + (exp(G_t - G_s) [s <= t] * Q K^T) U`` and
``S_C = Gamma_C S0 + K^T diag(exp(G_C - G)) U``.

Everything that does not involve ``S0`` is computed for many chunks at once (batched matmuls): the decays, the
explicit inverse ``(I + diag(beta) A)^-1`` (``triangular.unit_lower_inverse``, matmuls only), ``W_v = inv
diag(beta) V``, ``W_k = inv diag(beta Gamma) K`` and ``P = decay * Q K^T``. The sequential part across chunks is
then two matmuls per chunk, ``[W_k; Gamma Q] S0`` (giving ``U = W_v - W_k S0`` and the state part of ``O``) and
the state update; ``O = (Gamma Q S0) + P U`` is again batched. All of it is float32 (``Precision.HIGHEST``).

To bound memory, chunks are processed in *groups* of about ``_GROUP`` chunks: an outer ``jax.lax.scan`` over
groups carries the float32 state ``[B, N, H, E]``; inside a group the state-independent work is batched and an
inner scan passes the state from chunk to chunk. Memory: the inputs/outputs (O(T)) plus O(group * C^2) work.

Segments (``segment_ids``, 0 = padding): padding tokens are zeroed (k = q = beta = g = 0, exact no-ops);
tokens interact only within the same run (see ``segments.run_ids``), ``S0`` reaches only tokens of the run
that was open at the chunk start, so a boundary inside a chunk resets the state exactly like the reference.

Gradients: plain reverse-mode autodiff through the scans, with the group body under ``jax.checkpoint``: the
backward pass stores only the state entering each group and rematerialises one group at a time, so memory
stays linear in T (O(T / (group * C)) states plus one group's intermediates).

Shape letters: see ``spb2_jax.parallel.rules`` (N heads, H key head dim, E value head dim; ``m`` groups of ``n``
chunks). The capital ``Q, K, V, U, W, A, P, G, S`` of the formulas above are matrices, decays and states, not
shapes.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from einops import rearrange

from pallas_kernels.gated_delta_rule import gated_delta_rule_fwd
from spb2_jax.ops.chunking import chunk_groups, from_groups
from spb2_jax.ops.dtypes import acc_dtype
from spb2_jax.ops.norms import l2_norm
from spb2_jax.ops.segments import Segments, as_segments, chunk_runs, pad_time
from spb2_jax.ops.triangular import unit_lower_inverse

_HIGHEST = jax.lax.Precision.HIGHEST
_GROUP = 16  # chunks per group (batched state-independent work); see chunking.plan_groups


def chunk_gated_delta_rule(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    g: jax.Array,
    beta: jax.Array,
    *,
    scale: float | None = None,
    initial_state: jax.Array | None = None,
    segment_ids: Segments | jax.Array | None = None,
    chunk_size: int = 64,
    use_qk_l2norm: bool = True,
    impl: str = "xla",
    interpret: bool = False,
    target: str = "triton",
) -> tuple[jax.Array, jax.Array]:
    """Gated delta rule, chunked; same contract as ``gated_delta_rule_reference``.

    Args:
      q, k: ``[B, T, N, H]``; v: ``[B, T, N, E]``; g: log decays ``[B, T, N]`` (<= 0); beta: ``[B, T, N]``
        (in (0, 2) with negative eigenvalues).
      scale: default ``H ** -0.5``. initial_state: ``[B, N, H, E]``.
      segment_ids: ``[B, T]`` ids (0 = padding) or a ``Segments``.
      chunk_size: C; T need not be a multiple. use_qk_l2norm: L2-normalise q and k (eps 1e-6 in the sqrt).
      impl: ``"xla"`` (grouped chunk scan below) or ``"pallas"`` (forward in the Pallas kernel
        ``pallas_kernels.gated_delta_rule``, float32 only; gradients through the XLA path).
      interpret, target: the Pallas kernel's mode and target (``spb2_jax.options.Kernels``; CPU needs
        ``interpret=True``).
    Returns:
      ``o [B, T, N, E]`` in ``v.dtype`` and the final state ``[B, N, H, E]`` (float32 or wider).
    """
    B, T, N, H = q.shape
    E = v.shape[-1]
    if k.shape != (B, T, N, H) or v.shape[:3] != (B, T, N) or g.shape != (B, T, N) or beta.shape != (B, T, N):
        raise ValueError(f"shape mismatch: q{q.shape} k{k.shape} v{v.shape} g{g.shape} beta{beta.shape}")
    if chunk_size <= 0:
        raise ValueError(f"{chunk_size=} must be positive")
    if impl not in ("xla", "pallas"):
        raise ValueError(f"impl={impl!r} must be 'xla' or 'pallas'")
    acc = acc_dtype(q, k, v, g, beta)
    if impl == "pallas" and acc != jnp.float32:
        raise ValueError(f"impl='pallas': the gated-delta-rule kernel is float32-only, inputs accumulate in {acc}; "
                         "use impl='xla' (resolve_options does so for float64)")
    scale = H ** -0.5 if scale is None else scale
    seg = as_segments(segment_ids, B, T)
    real = seg.real[..., None]  # [B, T, 1]
    out_dtype = v.dtype
    q, k, v, g, beta = (x.astype(acc) for x in (q, k, v, g, beta))
    if use_qk_l2norm:
        q, k = l2_norm(q), l2_norm(k)
    q = jnp.where(real[..., None], q * scale, 0.0)
    k = jnp.where(real[..., None], k, 0.0)
    g = jnp.where(real, g, 0.0)
    beta = jnp.where(real, beta, 0.0)
    S0 = jnp.zeros((B, N, H, E), acc) if initial_state is None else initial_state.astype(acc)
    if impl == "pallas":
        o, S = _pallas_core(q, k, v, g, beta, S0, seg.labels, chunk_size, interpret, target)
    else:
        o, S = _xla_core(q, k, v, g, beta, S0, seg.labels, chunk_size)
    return o.astype(out_dtype), S


def _xla_core(q, k, v, g, beta, S0, labels, chunk_size):
    """Prepared inputs (normalised, scaled, padding zeroed) -> ``(o [B, T, N, E], S)``: grouped chunk scan."""
    xs = chunk_groups((q, k, v, g, beta), labels, chunk_size, _GROUP)
    S, o = jax.lax.scan(jax.checkpoint(_group_step, prevent_cse=False), S0, xs)
    return from_groups(o, q.shape[1]), S


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9))
def _pallas_core(q, k, v, g, beta, S0, labels, chunk_size, interpret, target):
    """``_xla_core`` with the forward in the Pallas kernel; the backward is the VJP of ``_xla_core`` (the kernel
    has no backward yet). float32 only (float64 tests use the XLA path)."""
    T = q.shape[1]
    C = chunk_size
    padded = [pad_time(x, C) for x in (q, k, v, g, beta)]
    runs, run_before = chunk_runs(labels, C)  # [n, B, C], [n, B]
    runs = rearrange(runs, "n B C -> B (n C)")
    o, S = gated_delta_rule_fwd(*padded, runs, jnp.moveaxis(run_before, 0, 1), S0, chunk_size=C,
                                interpret=interpret, target=target)
    return o[:, :T], S


def _pallas_fwd(q, k, v, g, beta, S0, labels, chunk_size, interpret, target):
    out = _pallas_core(q, k, v, g, beta, S0, labels, chunk_size, interpret, target)
    return out, (q, k, v, g, beta, S0, labels)


def _pallas_bwd(chunk_size, interpret, target, res, cot):
    del interpret, target
    *diff, labels = res
    _, vjp = jax.vjp(lambda *a: _xla_core(*a, labels, chunk_size), *diff)
    return (*vjp(cot), None)


_pallas_core.defvjp(_pallas_fwd, _pallas_bwd)


def _mm(a, b):
    return jnp.matmul(a, b, precision=_HIGHEST)


def _prepare(q, k, v, g, beta, runs, run_before):
    """State-independent per-chunk terms, batched over the ``n`` chunks of a group (all float32).

    Inputs: q, k ``[n, B, N, C, H]``; v ``[n, B, N, C, E]``; g, beta ``[n, B, N, C]``; runs ``[n, B, C]``;
    run_before ``[n, B]``. Returns ``w_v [n,B,N,C,E]``, ``wq = [W_k; Gamma Q] [n,B,N,2C,H]``,
    ``tail_kT [n,B,N,H,C]``, ``keep [n,B,N]`` and ``P [n,B,N,C,C]``.
    """
    C = q.shape[-2]
    G = jnp.cumsum(g, axis=-1)  # [n, B, N, C]
    same = (runs[..., :, None] == runs[..., None, :])[:, :, None]  # [n, B, 1, C, C]
    incl = jnp.tril(jnp.ones((C, C), bool)) & same
    diff = G[..., :, None] - G[..., None, :]  # (t, s)
    decay = jnp.where(incl, jnp.exp(jnp.where(incl, diff, 0.0)), 0.0)  # exponents <= 0 where kept
    carried = (runs == run_before[..., None])[:, :, None]  # [n, B, 1, C]: still in the run that owns S0
    gamma = jnp.where(carried, jnp.exp(G), 0.0)  # [n, B, N, C]
    strict = jnp.tril(jnp.ones((C, C), q.dtype), -1)
    A = (beta[..., :, None] * strict * decay) * _mm(k, jnp.swapaxes(k, -1, -2))
    inv = unit_lower_inverse(A)  # the inverse of I + diag(beta) A (unit diagonal implied)
    # separate products: on XLA:CPU two [C, C] x [C, E] batched dots are ~3x faster than one [C, C] x [C, 2E]
    w_v = _mm(inv, beta[..., None] * v)
    w_k = _mm(inv, (beta * gamma)[..., None] * k)
    wq = jnp.concatenate([w_k, gamma[..., None] * q], axis=-2)
    P = decay * _mm(q, jnp.swapaxes(k, -1, -2))
    last = (runs == runs[..., -1:])[:, :, None]  # [n, B, 1, C]: the run open at the chunk end
    tail = jnp.where(last, jnp.exp(G[..., -1:] - G), 0.0)
    tail_kT = jnp.swapaxes(tail[..., None] * k, -1, -2)
    keep = jnp.where(carried[..., -1], jnp.exp(G[..., -1]), 0.0)
    return w_v, wq, tail_kT, keep, P


def _group_step(S, xs):
    """One group of n chunks: ``S [B, N, H, E]`` -> (state after the group, outputs ``[n, B, N, C, E]``)."""
    w_v, wq, tail_kT, keep, P = _prepare(*xs)
    C = w_v.shape[-2]

    def chunk(S, x):
        w_v, wq, tail_kT, keep = x
        r = _mm(wq, S)  # [B, N, 2C, E]: W_k S0 and Gamma Q S0
        u = w_v - r[..., :C, :]
        return keep[..., None, None] * S + _mm(tail_kT, u), (u, r[..., C:, :])

    S, (u, o_state) = jax.lax.scan(chunk, S, (w_v, wq, tail_kT, keep))
    return S, o_state + _mm(P, u)
