"""Ring attention: softmax attention over a sequence sharded on the mesh axis ``sequence``, per-device memory
O(T / P).

Inside ``shard_map`` each shard keeps its queries and passes its keys / values (with the keys' metadata, e.g.
segment labels and global token indices) around the ring with ``ppermute``: at step ``s`` shard ``p`` holds the
K / V of shard ``(p - s) mod P``. The send of the next step's K / V is issued before the compute of this step,
so the transfer can overlap it. A step whose keys are all masked for this shard (causal: a later shard) is
skipped with ``lax.cond``. Each step's partial attention is computed tile by tile (query tiles x key tiles, an
online softmax with float32 statistics; a tile pair whose mask is empty is skipped) and merged into the running
``(max, sum, out)`` by log-sum-exp.

The backward (``jax.custom_vjp``) is the ring again: the K / V travel with their gradient accumulators ``dK,
dV`` (float32), each shard adds its queries' contribution for the K / V it holds, and after ``P`` hops the
accumulators are back on their owner. Saved for it: the local q, k, v, output and log-sum-exp; nothing of size
T.

Shape letters: B batch, L tokens per shard, N query heads, K kv heads, G = N / K, H head dim; lower-case ``t``,
``s`` are query / key tile lengths, ``n`` counts tiles.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
from einops import rearrange

from spb2_jax.ops.dtypes import acc_dtype
from spb2_jax.ops.segments import pad_time

AXIS = "sequence"
_HI = jax.lax.Precision.HIGHEST
_MASKED = -1e30


def _tiles(x: jax.Array, t: int) -> jax.Array:
    """``[B, L, ...]`` -> ``[n, B, t, ...]`` (padded with zeros: padding metadata must mean "masked")."""
    return rearrange(pad_time(x, t), "B (n t) ... -> n B t ...", t=t)


def _untile(x: jax.Array, L: int) -> jax.Array:
    return rearrange(x, "n B t ... -> B (n t) ...")[:, :L]


def _head_mask(mask: jax.Array, K: int) -> jax.Array:
    """``[B, t, s]`` or ``[B, N, t, s]`` -> broadcastable to ``[B, K, G, t, s]``."""
    return mask[:, None, None] if mask.ndim == 3 else rearrange(mask, "B (K G) t s -> B K G t s", K=K)


def _scores(qt, kt, scale, K):
    qg = rearrange(qt, "B t (K G) H -> B K G t H", K=K)
    return jnp.einsum("BKGtH,BsKH->BKGts", qg, kt, precision=_HI) * scale


def _merge(a, b):
    """Two partial softmax states ``(max, sum, out)`` merged by log-sum-exp."""
    (m1, l1, o1), (m2, l2, o2) = a, b
    m = jnp.maximum(m1, m2)
    c1, c2 = jnp.exp(m1 - m), jnp.exp(m2 - m)
    return m, l1 * c1 + l2 * c2, o1 * c1[..., None] + o2 * c2[..., None]


def _block_forward(q_t, k_t, v_t, qm_t, km_t, mask_fn, scale, K):
    """Partial attention of all query tiles ``q_t [nq, B, t, N, H]`` over one shard's key tiles
    ``[nk, B, s, K, H]``: ``(max, sum, out)`` with shapes ``[nq, B, K, G, t(, H)]``."""
    acc = q_t.dtype
    G = q_t.shape[3] // K

    def q_tile(args):
        qt, qm = args
        B, t = qt.shape[:2]

        def k_step(carry, xs):
            kt, vt, km = xs
            mask = _head_mask(mask_fn(qm, km), K)

            def compute(carry):
                s = jnp.where(mask, _scores(qt, kt, scale, K), _MASKED)
                m = s.max(-1)
                p = jnp.where(mask, jnp.exp(s - m[..., None]), 0.0)
                o = jnp.einsum("BKGts,BsKH->BKGtH", p, vt, precision=_HI)
                return _merge(carry, (m, p.sum(-1), o))

            return jax.lax.cond(mask.any(), compute, lambda c: c, carry), None

        H = qt.shape[-1]
        init = (jnp.full((B, K, G, t), _MASKED, acc), jnp.zeros((B, K, G, t), acc), jnp.zeros((B, K, G, t, H), acc))
        return jax.lax.scan(k_step, init, (k_t, v_t, km_t))[0]

    return jax.lax.map(jax.checkpoint(q_tile, prevent_cse=False), (q_t, qm_t))


def _block_backward(q_t, do_t, lse_t, d_t, k_t, v_t, qm_t, km_t, mask_fn, scale, K):
    """Gradients of one ring step: ``dq [nq, B, t, N, H]`` of the local queries and ``dk, dv [nk, B, s, K, H]``
    of the key tiles held, given the final ``lse`` and ``D = sum(do * out)`` (``[nq, B, K, G, t]``)."""

    def k_tile(dq, xs):
        kt, vt, km = xs

        def q_step(carry, ys):
            qt, dot, lse, d, qm = ys
            mask = _head_mask(mask_fn(qm, km), K)

            def compute(carry):
                dk, dv = carry
                s = _scores(qt, kt, scale, K)
                p = jnp.where(mask, jnp.exp(s - lse[..., None]), 0.0)  # [B, K, G, t, s]
                dog = rearrange(dot, "B t (K G) H -> B K G t H", K=K)
                dv = dv + jnp.einsum("BKGts,BKGtH->BsKH", p, dog, precision=_HI)
                dp = jnp.einsum("BKGtH,BsKH->BKGts", dog, vt, precision=_HI)
                ds = p * (dp - d[..., None]) * scale
                dqt = rearrange(jnp.einsum("BKGts,BsKH->BKGtH", ds, kt, precision=_HI), "B K G t H -> B t (K G) H")
                qg = rearrange(qt, "B t (K G) H -> B K G t H", K=K)
                dk = dk + jnp.einsum("BKGts,BKGtH->BsKH", ds, qg, precision=_HI)
                return (dk, dv), dqt

            def skip(carry):
                return carry, jnp.zeros_like(qt)

            return jax.lax.cond(mask.any(), compute, skip, carry)

        zero = jnp.zeros_like(kt)
        (dk, dv), dq_parts = jax.lax.scan(q_step, (zero, zero), (q_t, do_t, lse_t, d_t, qm_t))
        return dq + dq_parts, (dk, dv)

    dq, (dk, dv) = jax.lax.scan(k_tile, jnp.zeros_like(q_t), (k_t, v_t, km_t))
    return dq, dk, dv


def _shift(tree, shards):
    """Every shard's value to the next shard of the ring (shard P - 1 to shard 0)."""
    return jax.tree.map(lambda x: jax.lax.ppermute(x, AXIS, [(i, (i + 1) % shards) for i in range(shards)]), tree)


def ring_attention(q: jax.Array, k: jax.Array, v: jax.Array, q_meta: tuple, k_meta: tuple, *,
                   mask_fn: Callable, visible: Callable, shards: int, tile: int = 128) -> jax.Array:
    """Ring attention of one shard's queries (call inside ``shard_map`` over ``sequence``).

    Args:
      q: ``[B, L, N, H]``; k, v: ``[B, L, K, H]`` (this shard's tokens).
      q_meta, k_meta: tuples of ``[B, L, ...]`` arrays describing this shard's queries / keys (the keys' travel
        with them); padding rows must be masked by ``mask_fn`` when their metadata is all zeros.
      mask_fn: ``(q_meta tile, k_meta tile) -> bool [B, t, s] or [B, N, t, s]``: query may see key.
      visible: ``(this shard, source shard) -> bool``: the source's keys can be visible at all (else skipped).
      tile: query / key tile length.
    Returns:
      ``[B, L, N, H]`` in ``q.dtype``: softmax attention over every shard's keys; rows with no visible key are 0.
    """
    L = q.shape[1]
    t = max(1, min(tile, L))
    fn = _ring_fn(mask_fn, visible, shards, t, q.shape[2], k.shape[2])
    return fn(q, k, v, tuple(q_meta), tuple(k_meta))


@functools.lru_cache(maxsize=None)
def _ring_fn(mask_fn, visible, shards, t, N, K):
    scale_of = lambda H: H ** -0.5  # noqa: E731

    def prepare(q, k, v, q_meta, k_meta):
        acc = acc_dtype(q, k, v)
        tiles = lambda xs: tuple(_tiles(x, t) for x in xs)  # noqa: E731
        return (_tiles(q.astype(acc), t), _tiles(k.astype(acc), t), _tiles(v.astype(acc), t), tiles(q_meta),
                tiles(k_meta))

    def forward(q, k, v, q_meta, k_meta):
        L, H = q.shape[1], q.shape[3]
        q_t, k_t, v_t, qm_t, km_t = prepare(q, k, v, q_meta, k_meta)
        p = jax.lax.axis_index(AXIS)
        acc = q_t.dtype
        B, G = q.shape[0], N // K
        nq = q_t.shape[0]
        state = (jnp.full((nq, B, K, G, t), _MASKED, acc), jnp.zeros((nq, B, K, G, t), acc),
                 jnp.zeros((nq, B, K, G, t, H), acc))

        def step(carry, s):
            state, held = carry
            nxt = _shift(held, shards)  # issued before this step's compute
            src = (p - s) % shards

            def compute(state):
                k_h, v_h, km_h = held
                return _merge(state, _block_forward(q_t, k_h, v_h, qm_t, km_h, mask_fn, scale_of(H), K))

            state = jax.lax.cond(visible(p, src), compute, lambda c: c, state)
            return (state, nxt), None

        (state, _), _ = jax.lax.scan(step, (state, (k_t, v_t, km_t)), jnp.arange(shards))
        m, l, o = state
        out = jnp.where(l[..., None] > 0, o / jnp.where(l > 0, l, 1.0)[..., None], 0.0)
        lse = jnp.where(l > 0, m + jnp.log(jnp.where(l > 0, l, 1.0)), 0.0)
        out = _untile(rearrange(out, "n B K G t H -> n B t (K G) H"), L)
        return out.astype(q.dtype), lse

    @jax.custom_vjp
    def attend(q, k, v, q_meta, k_meta):
        return forward(q, k, v, q_meta, k_meta)[0]

    def attend_fwd(q, k, v, q_meta, k_meta):
        out, lse = forward(q, k, v, q_meta, k_meta)
        return out, (q, k, v, q_meta, k_meta, out, lse)

    def attend_bwd(res, g):
        q, k, v, q_meta, k_meta, out, lse = res
        L, H = q.shape[1], q.shape[3]
        q_t, k_t, v_t, qm_t, km_t = prepare(q, k, v, q_meta, k_meta)
        acc = q_t.dtype
        do_t = _tiles(g.astype(acc), t)
        d = jnp.sum(g.astype(acc) * out.astype(acc), axis=-1)  # [B, L, N]
        d_t = rearrange(_tiles(d, t), "n B t (K G) -> n B K G t", K=K)
        p = jax.lax.axis_index(AXIS)

        def step(carry, s):
            dq, held = carry
            src = (p - s) % shards
            k_h, v_h, km_h, dk_h, dv_h = held

            def compute(args):
                dq, dk_h, dv_h = args
                dq_b, dk_b, dv_b = _block_backward(q_t, do_t, lse, d_t, k_h, v_h, qm_t, km_h, mask_fn,
                                                   scale_of(H), K)
                return dq + dq_b, dk_h + dk_b, dv_h + dv_b

            dq, dk_h, dv_h = jax.lax.cond(visible(p, src), compute, lambda a: a, (dq, dk_h, dv_h))
            return (dq, _shift((k_h, v_h, km_h, dk_h, dv_h), shards)), None

        zeros = jnp.zeros_like(k_t)
        (dq, (_, _, _, dk, dv)), _ = jax.lax.scan(step, (jnp.zeros_like(q_t), (k_t, v_t, km_t, zeros, zeros)),
                                                  jnp.arange(shards))
        none = lambda xs: tuple(None for _ in xs)  # noqa: E731  integer metadata: no cotangent
        return (_untile(dq, L).astype(q.dtype), _untile(dk, L).astype(k.dtype), _untile(dv, L).astype(v.dtype),
                none(q_meta), none(k_meta))

    attend.defvjp(attend_fwd, attend_bwd)
    return attend
