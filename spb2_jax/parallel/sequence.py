"""Sequence parallelism: the token mixers over contiguous shards of the time axis (mesh axis ``sequence``).

Each function wraps a LOCAL op (the same op the 1-device model runs, passed in as a callable) in ``jax.shard_map``
over the ``sequence`` axis of the current mesh (``jax.set_mesh`` / ``spb2_jax.parallel.use_rules``); the other
mesh axes stay automatic. Inputs are ``[B, T, ...]`` with the ``Segments`` of the WHOLE rows (global labels and
positions), so every shard sees global positions. ``T`` not divisible by the shard count is padded at the end
with padding tokens (id 0), which every op treats as no-ops, and the outputs are cut back.

- Linear recurrences (``linear_recurrence``: GDN and GLA, the SSE partitions are heads of the same call): each
  shard runs the local chunked op twice. First (under ``jax.checkpoint``, so the backward recomputes it instead of
  keeping it) from the state ``[0 | I]`` with values ``[v | 0]``: the final state is ``[B_p | A_p]``, the affine
  summary ``S_out = A_p S_in + B_p`` of the shard (``A_p`` is ``K x K``; for GLA only its diagonal, one extra value
  column from the state ``[0 | 1]``). A segment that starts inside the shard resets the state, so ``A_p = 0`` there
  and the chain is cut without any extra logic. The summaries are combined in float32 at ``Precision.HIGHEST`` by
  a Hillis-Steele prefix scan with ``ppermute`` (``ceil(log2 P)`` rounds of one summary each, instead of an
  all-gather of all P summaries: O(1) memory in P and the same bytes per round at any T). Then each shard runs the
  op from its incoming state for its outputs. Communication per layer: ``ceil(log2 P) + 1`` messages of
  ``B x heads x K x (K + V)`` float32 (float64 for float64 inputs), independent of T.
- Sliding window (``window_attention``): each shard receives the last ``window - 1`` keys / values (and their
  segment labels) of the tokens before it by ``ppermute`` (more than one hop when a shard is shorter than the
  window) and runs the local op on ``[halo | shard]``.
- Decoding over a KV cache sharded along its slots (``cache_attention``): per-shard partial softmax combined by
  log-sum-exp (``pmax`` / ``psum``), flash-decoding across devices.
- Full causal attention (``causal_ring_attention``): ring attention (``spb2_jax.parallel.ring``): K / V pass
  around the ring by ``ppermute`` (the next hop issued before this step's compute), online softmax merged by
  log-sum-exp, later shards and tiles above the diagonal skipped; the backward is a ring too. O(T / P) memory.
- MoBA (``moba_ring_attention``): the key sums of the complete blocks are combined by ``psum`` (``T / C x K x H``,
  small), each shard selects the blocks of its own queries exactly as the 1-device op, then the ring with the
  per-token MoBA mask; key tiles no query of a tile selected are skipped. ``gathered_attention`` (K / V / queries
  all-gathered, the local op on the whole sequence) is the first version, kept as the simple twin.

Inside ``shard_map`` the value types are not checked (``check_vma=False``); every output is sharded (the final
recurrent states are stacked per shard and the last one taken outside), so no gradient goes through a replicated
output.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
from einops import rearrange
from jax.sharding import PartitionSpec

from spb2_jax.ops.cached_attention import query_tile
from spb2_jax.ops.dtypes import acc_dtype
from spb2_jax.ops.segments import Segments, pad_time
from spb2_jax.parallel.ring import ring_attention

AXIS = "sequence"
_HI = jax.lax.Precision.HIGHEST
_MASKED = -1e30  # finite: a shard that sees no key of a row contributes exp(_MASKED - max) = 0


def _context_shards(shards: int) -> None:
    mesh = jax.sharding.get_abstract_mesh()
    have = dict(mesh.shape).get(AXIS) if not mesh.empty else None
    if have != shards:
        raise ValueError(f"sequence parallelism over {shards} shards needs a mesh with {AXIS}={shards} set "
                         f"(spb2_jax.parallel.use_rules(mesh)); the current mesh has {AXIS}={have}")


def _sharded(fn: Callable, shards: int, arrays: tuple, replicated: tuple = (), n_seq: int = 1,
             n_stacked: int = 0):
    """``shard_map`` of ``fn(*local_arrays, *replicated)`` over the sequence axis: ``arrays`` are ``[B, T, ...]``
    (sharded on axis 1; T padded to a multiple of ``shards``); ``replicated`` go to every shard. ``fn`` returns
    ``n_seq`` arrays ``[B, L, ...]`` (concatenated back along time and cut to T) and then ``n_stacked`` arrays
    that get a leading per-shard axis (the last shard's is returned)."""
    _context_shards(shards)
    T = arrays[0].shape[1]
    padded = [pad_time(a, shards) for a in arrays]
    seq = PartitionSpec(None, AXIS)

    def body(*args):
        outs = fn(*args)
        return tuple(outs[:n_seq]) + tuple(x[None] for x in outs[n_seq:])

    outs = jax.shard_map(body, in_specs=(seq,) * len(padded) + (PartitionSpec(),) * len(replicated),
                         out_specs=(seq,) * n_seq + (PartitionSpec(AXIS),) * n_stacked, axis_names={AXIS},
                         check_vma=False)(*padded, *replicated)
    return tuple(x[:, :T] for x in outs[:n_seq]) + tuple(x[-1] for x in outs[n_seq:])


def _shift(x: jax.Array, hop: int, shards: int) -> jax.Array:
    """The value of shard ``p - hop`` on shard ``p`` (zeros where ``p < hop``)."""
    return jax.lax.ppermute(x, AXIS, [(i, i + hop) for i in range(shards - hop)])


def _before(p: jax.Array, hop: int) -> jax.Array:
    return p >= hop


# ---------------------------------------------------------------- linear recurrences (GDN, GLA)

def _rebase_labels(labels: jax.Array, shards: int) -> jax.Array:
    """Segment labels of a shard renumbered so that the segment continuing from the shards before it is 1 (it
    continues the incoming state, like the first segment of a row) and later ones count on from there."""
    p = jax.lax.axis_index(AXIS)
    last = jax.lax.all_gather(labels.max(axis=1), AXIS)  # [P, B] highest label of every shard (tiny)
    earlier = (jnp.arange(shards) < p)[:, None]
    base = jnp.maximum(jnp.max(jnp.where(earlier, last, 0), axis=0), 1)  # [B]
    return jnp.where(labels > 0, labels - base[:, None] + 1, 0)


def _compose(first, then, diagonal: bool):
    """Affine maps ``S -> A S + B``: ``then`` after ``first``, in float32 at HIGHEST precision."""
    (a1, b1), (a2, b2) = first, then
    if diagonal:  # a: [B, N, K] (the diagonal of A)
        return a2 * a1, a2[..., None] * b1 + b2
    return (jnp.einsum("bnij,bnjk->bnik", a2, a1, precision=_HI),
            jnp.einsum("bnij,bnjv->bniv", a2, b1, precision=_HI) + b2)


def _apply(summary, state, diagonal: bool):
    a, b = summary
    if diagonal:
        return a[..., None] * state + b
    return jnp.einsum("bnij,bnjv->bniv", a, state, precision=_HI) + b


def _prefix_summaries(summary, shards: int, diagonal: bool):
    """Inclusive prefix (shard 0 first) of the shards' affine summaries: Hillis-Steele, ``ppermute`` per round."""
    p = jax.lax.axis_index(AXIS)
    hop = 1
    while hop < shards:
        received = jax.tree.map(lambda x, h=hop: _shift(x, h, shards), summary)
        combined = _compose(received, summary, diagonal)
        summary = jax.tree.map(lambda c, s, h=hop: jnp.where(_before(p, h), c, s), combined, summary)
        hop *= 2
    return summary


def linear_recurrence(local: Callable, q, k, v, gates: tuple, *, initial_state, segments: Segments,
                      diagonal: bool, shards: int):
    """Sequence-parallel ``local(q, k, v, *gates, initial_state=, segments=) -> (o, final_state)``.

    Args:
      local: the 1-device chunked op (state ``[B, N, K, V]`` float32; an identity-like state on value columns
        whose values are zero must evolve as the homogeneous recurrence, which holds for GDN and GLA).
      q, k: ``[B, T, N, K]``; v: ``[B, T, N, V]``; gates: per-token gate arrays ``[B, T, ...]``.
      initial_state: ``[B, N, K, V]`` or None (zero); segments: of the whole rows.
      diagonal: the transition is diagonal (GLA) rather than a full ``K x K`` matrix (GDN).
    Returns:
      ``(o [B, T, N, V], final_state [B, N, K, V] float32)`` equal to ``local`` on one device.
    """
    B, _, N, K = k.shape
    V = v.shape[-1]
    E = 1 if diagonal else K
    acc = acc_dtype(q, k, v)  # float32 (float64 under x64 inputs)
    s0 = jnp.zeros((B, N, K, V), acc) if initial_state is None else initial_state.astype(acc)
    eye = jnp.ones((K, 1), acc) if diagonal else jnp.eye(K, dtype=acc)
    n_gates = len(gates)

    def shard(q, k, v, *rest):
        gs, (ids, labels, positions), s_init = rest[:n_gates], rest[n_gates:n_gates + 3], rest[-1]
        seg = Segments(ids=ids, labels=_rebase_labels(labels, shards), positions=positions)

        def summary_pass(q, k, v, gs):
            v_aug = jnp.concatenate([v, jnp.zeros(v.shape[:-1] + (E,), v.dtype)], axis=-1)
            init = jnp.concatenate([jnp.zeros((B, N, K, V), acc), jnp.broadcast_to(eye, (B, N, K, E))], -1)
            _, s = local(q, k, v_aug, *gs, initial_state=init, segments=seg)
            s = s.astype(acc)
            a = s[..., V:]
            return (a[..., 0] if diagonal else a), s[..., :V]

        summary = jax.checkpoint(summary_pass)(q, k, v, gs)
        total = _prefix_summaries(summary, shards, diagonal)  # shards 0..p
        s_out = _apply(total, s_init, diagonal)  # state after shard p
        p = jax.lax.axis_index(AXIS)
        s_in = jnp.where(_before(p, 1), _shift(s_out, 1, shards), s_init)
        o, s_fin = local(q, k, v, *gs, initial_state=s_in, segments=seg)
        return o, s_fin

    o, state = _sharded(shard, shards, (q, k, v) + tuple(gates) + (segments.ids, segments.labels,
                                                                  segments.positions),
                        replicated=(s0,), n_stacked=1)
    return o, state


# ---------------------------------------------------------------- sliding-window attention

def window_attention(local: Callable, q, k, v, *, window: int, segments: Segments, shards: int) -> jax.Array:
    """Sequence-parallel ``local(q, k, v, segments=) -> o`` for a causal window of ``window`` keys: each shard
    gets the ``window - 1`` keys / values before it from its left neighbours (``ppermute``; one hop when a shard
    holds at least ``window - 1`` tokens)."""
    need = window - 1

    def shard(q, k, v, ids, labels, positions):
        L = q.shape[1]
        if need == 0:
            return (local(q, k, v, segments=Segments(ids=ids, labels=labels, positions=positions)),)
        hops = math.ceil(need / L)
        parts = [(k, v, ids, labels, positions)]
        for hop in range(1, hops + 1):
            take = min(L, need - (hop - 1) * L)  # the last ``take`` tokens of shard p - hop
            parts.insert(0, tuple(_shift(x[:, L - take:], hop, shards) for x in (k, v, ids, labels, positions)))
        ke, ve, ide, lae, poe = (jnp.concatenate(xs, axis=1) for xs in zip(*parts))
        qe = jnp.concatenate([jnp.zeros((q.shape[0], need) + q.shape[2:], q.dtype), q], axis=1)
        o = local(qe, ke, ve, segments=Segments(ids=ide, labels=lae, positions=poe))
        return (o[:, need:],)

    return _sharded(shard, shards, (q, k, v, segments.ids, segments.labels, segments.positions))[0]


# ---------------------------------------------------------------- full causal attention (ring)

def _causal_segment_mask(q_meta, k_meta):
    """Query sees key: same segment (label, 0 = padding) and key index <= query index (global)."""
    (ql, qi), (kl, ki) = q_meta, k_meta
    return (ql[:, :, None] == kl[:, None, :]) & (ql[:, :, None] != 0) & (ki[:, None, :] <= qi[:, :, None])


def _earlier_or_same_shard(p, src):
    return src <= p


def causal_ring_attention(q, k, v, *, segments: Segments, shards: int, tile: int = 128) -> jax.Array:
    """Sequence-parallel full causal attention inside segments by ring attention (``spb2_jax.parallel.ring``):
    K / V pass shard to shard, shards after this one are skipped (causal), tiles above the diagonal too."""

    def shard(q, k, v, labels):
        L = q.shape[1]
        idx = jnp.broadcast_to(jax.lax.axis_index(AXIS) * L + jnp.arange(L, dtype=jnp.int32), labels.shape)
        meta = (labels, idx)
        return (ring_attention(q, k, v, meta, meta, mask_fn=_causal_segment_mask, visible=_earlier_or_same_shard,
                               shards=shards, tile=tile),)

    return _sharded(shard, shards, (q, k, v, segments.labels))[0]


# ---------------------------------------------------------------- MoBA (ring)

def _complete_block_sums(k, labels, positions, chunk_size: int, shards: int):
    """Key sums of every complete MoBA block of the whole rows, ``[B, nb, K, H]`` (``nb = T // C``, the most
    complete blocks T tokens can hold; blocks numbered in order along the row), and the number of complete
    blocks ending before each local token, ``[B, L]``.

    A block is complete iff it holds a token at position ``C - 1`` of its block (its end marker); only complete
    blocks can be selected (a query picks strictly earlier blocks of its own segment). Each shard adds its keys to
    their block's slot and the slots are ``psum`` med: ``nb x K x H`` per shard, not T-sized.
    """
    B, L = labels.shape
    C = chunk_size
    nb = max(L * shards // C, 1)
    p = jax.lax.axis_index(AXIS)
    real = labels != 0
    end = real & (positions % C == C - 1)
    counts = jax.lax.all_gather(end.sum(axis=1, dtype=jnp.int32), AXIS)  # [P, B]
    base = jnp.sum(jnp.where((jnp.arange(shards) < p)[:, None], counts, 0), axis=0)  # [B]
    before = base[:, None] + jnp.cumsum(end, axis=1, dtype=jnp.int32) - end  # markers strictly before t
    # the label of each complete block (from its end marker); a token belongs to block ``before`` iff labels match
    block_label = jax.vmap(lambda lab, i: jnp.zeros((nb + 1,), jnp.int32).at[i].max(lab))(
        labels, jnp.where(end, before, nb))
    block_label = jax.lax.pmax(block_label, AXIS)[:, :nb]
    member = real & (before < nb) & (jnp.take_along_axis(block_label, jnp.minimum(before, nb - 1), axis=1) == labels)
    acc = acc_dtype(k)
    slot = jnp.where(member, before, nb)
    sums = jax.vmap(lambda x, i: jax.ops.segment_sum(x, i, num_segments=nb + 1))(k.astype(acc), slot)[:, :nb]
    return jax.lax.psum(sums, AXIS), before


def _moba_select(q, means, first, blk, topk: int, tile: int = 64):
    """Top-(k-1) strictly earlier blocks of each local query, ``[B, L, N, k-1]`` segment-relative indices (-1 =
    none): ``gate = q . mean`` over the complete blocks ``first .. first + blk - 1`` of the query's segment (ties
    pick the lower block), as ``spb2_jax.ops.moba_blockwise.moba_select_blocks``."""
    B, L, N, H = q.shape
    nb, K = means.shape[1], means.shape[2]
    R = topk - 1
    n_pick = min(R, nb)
    t = max(1, min(tile, L))
    acc = acc_dtype(q, means)

    def one_tile(args):
        qt, ft, bt = args
        qg = rearrange(qt.astype(acc), "B t (K G) H -> B t K G H", K=K)
        gate = rearrange(jnp.einsum("BtKGH,BnKH->BtKGn", qg, means, precision=_HI), "B t K G n -> B t (K G) n")
        n = jnp.arange(nb)
        earlier = (n >= ft[..., None]) & (n < (ft + bt)[..., None])  # [B, t, nb]
        val, idx = jax.lax.top_k(jnp.where(earlier[:, :, None], gate, -jnp.inf), n_pick)
        return jnp.where(val > -jnp.inf, idx - ft[:, :, None, None], -1).astype(jnp.int32)

    tiles = (rearrange(pad_time(q, t), "B (n t) N H -> n B t N H", t=t), rearrange(pad_time(first, t), "B (n t) -> n B t", t=t),
             rearrange(pad_time(blk, t), "B (n t) -> n B t", t=t))
    sel = rearrange(jax.lax.map(one_tile, tiles), "n B t N r -> B (n t) N r")[:, :L]
    if n_pick < R:
        sel = jnp.concatenate([sel, jnp.full(sel.shape[:-1] + (R - n_pick,), -1, jnp.int32)], axis=-1)
    return sel


def _moba_mask(q_meta, k_meta):
    """Query sees key: same segment, causal, and the key's block is the query's own block or one it selected
    (``[B, N, t, s]``)."""
    (ql, qi, qb, sel), (kl, ki, kb) = q_meta, k_meta
    base = (ql[:, :, None] == kl[:, None, :]) & (ql[:, :, None] != 0) & (ki[:, None, :] <= qi[:, :, None])
    block = qb[:, :, None] == kb[:, None, :]  # [B, t, s]
    picked = jnp.any(sel[:, :, :, :, None] == kb[:, None, None, None, :], axis=3)  # [B, t, N, s]
    return rearrange((base & block)[:, :, None] | (base[:, :, None] & picked), "B t N s -> B N t s")


def moba_ring_attention(q, k, v, *, chunk_size: int, topk: int, segments: Segments, shards: int,
                        tile: int = 128) -> jax.Array:
    """Sequence-parallel MoBA: complete blocks' key sums combined by ``psum`` (``T / C x K x H``), each shard
    selects the blocks of its own queries, then ring attention with the per-token MoBA mask (tile pairs that no
    query of the tile selected are skipped)."""

    def shard(q, k, v, labels, positions):
        L = q.shape[1]
        sums, before = _complete_block_sums(jax.lax.stop_gradient(k), labels, positions, chunk_size, shards)
        blk = positions // chunk_size
        sel = _moba_select(jax.lax.stop_gradient(q), sums / chunk_size, before - blk, blk, topk)
        idx = jnp.broadcast_to(jax.lax.axis_index(AXIS) * L + jnp.arange(L, dtype=jnp.int32), labels.shape)
        blk = jnp.where(labels != 0, blk, -1)
        return (ring_attention(q, k, v, (labels, idx, blk, sel), (labels, idx, blk), mask_fn=_moba_mask,
                               visible=_earlier_or_same_shard, shards=shards, tile=tile),)

    return _sharded(shard, shards, (q, k, v, segments.labels, segments.positions))[0]


# ---------------------------------------------------------------- MoBA (all-gather, first version)

def gathered_attention(local: Callable, q, k, v, *, segments: Segments, shards: int) -> jax.Array:
    """Sequence-parallel ``local(q, k, v, segments=) -> o`` by all-gathering the sequence (first version)."""

    def shard(q, k, v, ids, labels, positions):
        L = q.shape[1]
        full = [jax.lax.all_gather(x, AXIS, axis=1, tiled=True) for x in (q, k, v, ids, labels, positions)]
        o = local(*full[:3], segments=Segments(ids=full[3], labels=full[4], positions=full[5]))
        return (jax.lax.dynamic_slice_in_dim(o, jax.lax.axis_index(AXIS) * L, L, axis=1),)

    return _sharded(shard, shards, (q, k, v, segments.ids, segments.labels, segments.positions))[0]


# ---------------------------------------------------------------- attention over a sequence-sharded KV cache

def _partial_attention(q, k, v, mask, scale):
    """Unnormalised attention of ``q [B, t, N, H]`` over one shard's ``k, v [B, K, s, H]`` with ``mask``
    (``[B, t, s]`` or ``[B, N, t, s]``): ``(max [B, N, t], sum [B, N, t], out [B, N, t, H])`` in the accumulation
    dtype; a row with no visible key has max ``_MASKED`` and sum 0."""
    B, t, N, H = q.shape
    K = k.shape[1]
    acc = acc_dtype(q, k, v)
    qg = rearrange(q.astype(acc), "B t (K G) H -> B K G t H", K=K)
    logits = jnp.einsum("BKGtH,BKsH->BKGts", qg, k.astype(acc), precision=_HI) * scale
    mask = mask[:, None, None] if mask.ndim == 3 else rearrange(mask, "B (K G) t s -> B K G t s", K=K)
    logits = jnp.where(mask, logits, _MASKED)
    m = logits.max(-1)
    w = jnp.where(mask, jnp.exp(logits - m[..., None]), 0.0)
    o = jnp.einsum("BKGts,BKsH->BKGtH", w, v.astype(acc), precision=_HI)
    flat = lambda x: rearrange(x, "B K G ... -> B (K G) ...")  # noqa: E731
    return flat(m), flat(w.sum(-1)), flat(o)


def cache_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask_fn: Callable, qpos: jax.Array, *,
                    shards: int) -> jax.Array:
    """Attention of new queries over a position-indexed KV cache sharded along its slots (flash-decoding
    across devices).

    Each shard scores the queries against its own ``S / P`` slots (``mask_fn(q_tile, qpos_tile, slots)`` gives
    the mask of those slot indices) and keeps the unnormalised partial ``(max, sum, out)``; the shards combine
    them by log-sum-exp in float32: the global max by ``pmax``, then ``psum`` of the rescaled sums and outputs.
    Nothing of size ``S`` moves between devices: per query ``N x (H + 2)`` values per shard.

    Args:
      q: ``[B, t, N, H]`` (replicated over ``sequence``); k, v: ``[B, K, S, H]`` (the ``KVCache`` layout, S a
        multiple of ``shards``, sharded over ``sequence``); qpos: ``[B, t]`` positions (-1: padding query).
    Returns:
      ``[B, t, N, H]`` in ``q.dtype``; rows with no visible key are zero.
    """
    _context_shards(shards)
    B, t, N, H = q.shape
    scale = H ** -0.5
    tile = query_tile(B, N, t, k.shape[2] // shards)

    def shard(q, k, v, qpos):
        S_loc = k.shape[2]
        slots = jax.lax.axis_index(AXIS) * S_loc + jnp.arange(S_loc)

        def one_tile(qt, pt):
            m, l, o = _partial_attention(qt, k, v, mask_fn(qt, pt, slots), scale)
            m_all = jax.lax.pmax(m, AXIS)
            corr = jnp.exp(m - m_all)
            l_all = jax.lax.psum(l * corr, AXIS)
            o_all = jax.lax.psum(o * corr[..., None], AXIS)
            out = jnp.where(l_all[..., None] > 0, o_all / jnp.where(l_all > 0, l_all, 1.0)[..., None], 0.0)
            return rearrange(out, "B N t H -> B t N H").astype(q.dtype)

        if tile >= t:
            return one_tile(q, qpos)
        qt = rearrange(pad_time(q, tile), "B (n t) N H -> n B t N H", t=tile)
        pt = rearrange(pad_time(qpos, tile, value=-1), "B (n t) -> n B t", t=tile)
        out = jax.lax.map(lambda a: one_tile(*a), (qt, pt))
        return rearrange(out, "n B t N H -> B (n t) N H")[:, :t]

    cache_spec = PartitionSpec(None, None, AXIS)
    return jax.shard_map(shard, in_specs=(PartitionSpec(), cache_spec, cache_spec, PartitionSpec()),
                         out_specs=PartitionSpec(), axis_names={AXIS}, check_vma=False)(q, k, v, qpos)
