"""Chunked gated delta rule forward, TPU style (Mosaic TPU): the grid is (batch row, head, chunk) with the chunk
dimension sequential ("arbitrary"); the float32 state ``[H, E]`` stays in VMEM scratch from one chunk to the next
and the pipeline streams one chunk of q/k/v per step.

Same arithmetic as the GPU-style kernel in ``gated_delta_rule`` (see its docstring), laid out for Mosaic: heads
before time (``[B, N, T, H]``: a block's last two dims are (C, H)); per-token scalars (gates, beta, run ids)
come as columns ``[C, 1]`` and rows ``[1, C]`` so that every value stays two-dimensional; the run owning each
chunk's incoming state and the run of its last token are scalar-prefetched into SMEM (flattened: SMEM pads the
last dim of N-D arrays). The unit lower-triangular solve is forward substitution with masked whole-tile updates
(no matrix-vector products with one row) on the transposed matrix, which is built directly; matmuls contract
over either dim instead of transposing.

Shape letters: see ``spb2_jax.parallel.rules`` (N heads, H key head dim, E value head dim).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.platform import tpu_params

_HIGHEST = jax.lax.Precision.HIGHEST


def _dot(a, b, trans_a=False, trans_b=False):
    """float32 ``a @ b``; ``trans_a`` / ``trans_b`` contract over the other dim (one matmul, no explicit
    transpose)."""
    dims = (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ()))
    return jax.lax.dot_general(a, b, dims, precision=_HIGHEST, preferred_element_type=jnp.float32)


def _unit_lower_inverse(At, row, col):
    """``(I + A)^-1`` of strictly lower-triangular ``A [C, C]``, given as its transpose ``At`` (built directly,
    so that column i of ``At`` = row i of ``A``): row i of X is ``e_i - sum_{j<i} A_ij X_j``."""
    eye = (row == col).astype(At.dtype)

    def substitute(i, X):
        a_i = jnp.sum(jnp.where(col == i, At, 0.0), axis=1, keepdims=True)  # [C, 1]: A_ij over j
        e_i = jnp.sum(jnp.where(row == i, eye, 0.0), axis=0, keepdims=True)  # [1, C]
        x_i = e_i - jnp.sum(a_i * X, axis=0, keepdims=True)
        return jnp.where(row == i, x_i, X)

    return jax.lax.fori_loop(1, At.shape[0], substitute, eye)


def _gdn_kernel(before_ref, last_ref, q_ref, k_ref, v_ref, g_col_ref, g_row_ref, beta_ref, beta_row_ref,
                run_col_ref, run_row_ref, h0_ref, o_ref, ht_ref, S_ref, *, chunk):
    b, c = pl.program_id(0), pl.program_id(2)
    n = pl.num_programs(2)
    C = chunk
    t = jax.lax.broadcasted_iota(jnp.int32, (C, C), 0)
    s = jax.lax.broadcasted_iota(jnp.int32, (C, C), 1)

    @pl.when(c == 0)
    def _():
        S_ref[...] = h0_ref[...].astype(jnp.float32)

    S = S_ref[...]
    q, k, v = q_ref[...], k_ref[...], v_ref[...]
    beta, runs_c, runs_r = beta_ref[...], run_col_ref[...], run_row_ref[...]  # [C, 1], [C, 1], [1, C]
    G_c = jnp.sum(jnp.where(s <= t, g_row_ref[...], 0.0), axis=1, keepdims=True)  # inclusive cumsum, [C, 1]
    G_r = jnp.sum(jnp.where(t <= s, g_col_ref[...], 0.0), axis=0, keepdims=True)  # the same as a row, [1, C]
    same = runs_c == runs_r
    incl, incl_t = (s <= t) & same, (t <= s) & same
    decay = jnp.where(incl, jnp.exp(jnp.where(incl, G_c - G_r, 0.0)), 0.0)
    decay_t = jnp.where(incl_t, jnp.exp(jnp.where(incl_t, G_r - G_c, 0.0)), 0.0)  # decay transposed
    before = before_ref[b * n + c]
    gamma = jnp.where(runs_c == before, jnp.exp(G_c), 0.0)  # [C, 1]
    kk = _dot(k, k, trans_b=True)  # symmetric
    W = _unit_lower_inverse(jnp.where(t < s, beta_row_ref[...] * decay_t * kk, 0.0), t, s)
    u = _dot(W, beta * v) - _dot(_dot(W, beta * gamma * k), S)
    o_ref[...] = (_dot(gamma * q, S) + _dot(decay * _dot(q, k, trans_b=True), u)).astype(o_ref.dtype)
    run_last = last_ref[b * n + c]  # run id of the chunk's last token (scalar prefetch)
    G_last = jnp.sum(jnp.where(s[:1] == C - 1, G_r, 0.0), axis=1, keepdims=True)  # [1, 1]
    tail = jnp.where(runs_c == run_last, jnp.exp(G_last - G_c), 0.0)  # [C, 1]
    keep = jnp.exp(G_last) * (run_last == before).astype(jnp.float32)
    S_ref[...] = keep * S + _dot(tail * k, u, trans_a=True)

    @pl.when(c == pl.num_programs(2) - 1)
    def _():
        ht_ref[...] = S_ref[...]


def gated_delta_rule_fwd_tpu(q, k, v, g, beta, runs, run_before, initial_state, *, chunk_size: int,
                             interpret: bool = False):
    """TPU-style twin of ``gated_delta_rule.gated_delta_rule_fwd`` (same arguments, same results)."""
    B, T, N, H = q.shape
    E = v.shape[-1]
    C = chunk_size
    n = T // C
    heads_first = lambda x: jnp.swapaxes(x, 1, 2)  # noqa: E731  [B, T, N, ...] <-> [B, N, T, ...]
    per_chunk = lambda x: jnp.swapaxes(x, 1, 2).reshape(B, N, n, C)  # noqa: E731  [B, T, N] -> [B, N, n, C]
    col = lambda x: per_chunk(x)[..., None]  # noqa: E731  [B, N, n, C, 1]
    row = lambda x: per_chunk(x)[..., None, :]  # noqa: E731  [B, N, n, 1, C]
    tile = lambda d: pl.BlockSpec((None, None, C, d), lambda b, h, c, *_: (b, h, c, 0))  # noqa: E731
    col_spec = pl.BlockSpec((None, None, None, C, 1), lambda b, h, c, *_: (b, h, c, 0, 0))
    row_spec = pl.BlockSpec((None, None, None, 1, C), lambda b, h, c, *_: (b, h, c, 0, 0))
    run_col = pl.BlockSpec((None, None, C, 1), lambda b, h, c, *_: (b, c, 0, 0))
    run_row = pl.BlockSpec((None, None, 1, C), lambda b, h, c, *_: (b, c, 0, 0))
    state = pl.BlockSpec((None, None, H, E), lambda b, h, c, *_: (b, h, 0, 0))
    o, ht = pl.pallas_call(
        functools.partial(_gdn_kernel, chunk=C),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2, grid=(B, N, n),
            in_specs=[tile(H), tile(H), tile(E), col_spec, row_spec, col_spec, row_spec, run_col, run_row, state],
            out_specs=[tile(E), state],
            scratch_shapes=[pltpu.VMEM((H, E), jnp.float32)]),
        out_shape=[jax.ShapeDtypeStruct((B, N, T, E), jnp.float32), jax.ShapeDtypeStruct((B, N, H, E), jnp.float32)],
        interpret=interpret,
        compiler_params=tpu_params(interpret, ("parallel", "parallel", "arbitrary")),
        name="chunk_gated_delta_rule_fwd_tpu",
    )(run_before.reshape(-1), runs[:, C - 1::C].reshape(-1), heads_first(q), heads_first(k), heads_first(v),
      col(g), row(g), col(beta), row(beta),
      runs.reshape(B, n, C, 1), runs.reshape(B, n, 1, C), initial_state)
    return heads_first(o), ht
