"""Reference linear-attention recurrences: one ``jax.lax.scan`` step per token, float32 state ``[B, N, H, E]``.

Shape letters: see ``spb2_jax.parallel.rules`` (N heads, H key head dim, E value head dim).

Both recurrences share the segment handling of ``spb2_jax.ops.segments`` (``segment_ids [B, T]``, 0 = padding):
- a padding token leaves the state untouched and outputs zeros;
- the state is reset to zero at every segment start except the first segment of a row, which continues
  ``initial_state`` (so left padding keeps it).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from spb2_jax.ops.dtypes import acc_dtype
from spb2_jax.ops.norms import l2_norm
from spb2_jax.ops.segments import Segments, as_segments


def _segment_scan(
    step: Callable[[jax.Array, tuple], tuple[jax.Array, jax.Array]],
    xs: tuple[jax.Array, ...],
    state_shape: tuple[int, ...],
    initial_state: jax.Array | None,
    segment_ids: Segments | jax.Array | None,
) -> tuple[jax.Array, jax.Array]:
    """Scan ``step(state, x_t) -> (new_state, o_t)`` over axis 1 of every array in ``xs`` with segment resets."""
    B, T = xs[0].shape[:2]
    labels = as_segments(segment_ids, B, T).labels
    acc = acc_dtype(*xs)
    state0 = jnp.zeros(state_shape, acc) if initial_state is None else initial_state.astype(acc)
    bshape = (B,) + (1,) * (len(state_shape) - 1)

    def body(carry, inp):
        state, last_label = carry
        label, x = inp
        active = label != 0
        reset = active & (label > 1) & (label != last_label)
        state = jnp.where(reset.reshape(bshape), 0.0, state)
        new_state, o = step(state, x)
        state = jnp.where(active.reshape(bshape), new_state, state)
        o = jnp.where(active.reshape((B,) + (1,) * (o.ndim - 1)), o, 0.0)
        return (state, jnp.where(active, label, last_label)), o

    xs_t = tuple(jnp.moveaxis(x, 1, 0) for x in xs)
    (state, _), o = jax.lax.scan(body, (state0, jnp.zeros((B,), labels.dtype)),
                                 (jnp.moveaxis(labels, 1, 0), xs_t))
    return jnp.moveaxis(o, 0, 1), state


def gated_delta_rule_reference(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    g: jax.Array,
    beta: jax.Array,
    *,
    scale: float | None = None,
    initial_state: jax.Array | None = None,
    segment_ids: Segments | jax.Array | None = None,
    use_qk_l2norm: bool = True,
) -> tuple[jax.Array, jax.Array]:
    """Gated delta rule, token by token.

    ``S <- S * exp(g_t); S <- S + k_t (beta_t (v_t - S^T k_t))^T; o_t = S^T (scale * q_t)``.

    Args:
      q, k: ``[B, T, N, H]``; v: ``[B, T, N, E]``; g (log decay, <= 0), beta: ``[B, T, N]``.
      scale: default ``H ** -0.5``. initial_state: ``[B, N, H, E]``.
      segment_ids: ``[B, T]`` int (0 = padding) or a ``Segments`` (see module docstring).
      use_qk_l2norm: L2-normalise q and k over H first (eps 1e-6 inside the sqrt).
    Returns:
      ``o [B, T, N, E]`` in ``v.dtype`` and the final state ``[B, N, H, E]`` float32.
    """
    B, T, N, H = q.shape
    E = v.shape[-1]
    scale = H ** -0.5 if scale is None else scale
    f32 = acc_dtype(q, k, v, g, beta)
    if use_qk_l2norm:
        q, k = l2_norm(q.astype(f32)), l2_norm(k.astype(f32))

    def step(S, x):
        q_t, k_t, v_t, g_t, b_t = x
        S = S * jnp.exp(g_t)[..., None, None]
        u = b_t[..., None] * (v_t - jnp.einsum("BNH,BNHE->BNE", k_t, S))
        S = S + k_t[..., :, None] * u[..., None, :]
        return S, jnp.einsum("BNH,BNHE->BNE", q_t * scale, S)

    xs = tuple(x.astype(f32) for x in (q, k, v, g, beta))
    o, S = _segment_scan(step, xs, (B, N, H, E), initial_state, segment_ids)
    return o.astype(v.dtype), S


def gla_reference(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    gk: jax.Array,
    *,
    scale: float | None = None,
    initial_state: jax.Array | None = None,
    segment_ids: Segments | jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Gated linear attention with per-key log gates, token by token.

    ``S <- S * exp(gk_t)[:, None] + k_t v_t^T; o_t = S^T (scale * q_t)``.

    Args:
      q, k, gk: ``[B, T, N, H]``; v: ``[B, T, N, E]``; scale: default ``H ** -0.5``.
      initial_state: ``[B, N, H, E]``; segment_ids: ``[B, T]``, 0 = padding.
    Returns:
      ``o [B, T, N, E]`` in ``v.dtype`` and the final state ``[B, N, H, E]`` float32.
    """
    B, T, N, H = q.shape
    E = v.shape[-1]
    scale = H ** -0.5 if scale is None else scale

    def step(S, x):
        q_t, k_t, v_t, gk_t = x
        S = S * jnp.exp(gk_t)[..., None] + k_t[..., :, None] * v_t[..., None, :]
        return S, jnp.einsum("BNH,BNHE->BNE", q_t * scale, S)

    xs = tuple(x.astype(acc_dtype(q, k, v, gk)) for x in (q, k, v, gk))
    o, S = _segment_scan(step, xs, (B, N, H, E), initial_state, segment_ids)
    return o.astype(v.dtype), S
