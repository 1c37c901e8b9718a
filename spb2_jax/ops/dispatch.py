"""The one place where a token-mixing op is routed to an implementation.

Every function takes the resolved ``spb2_jax.options.Kernels`` record (chosen once, at the model boundary, by
``resolve_options``; the fallbacks — GLA has no Pallas kernel, the GDN kernel is float32-only — are decided
there) and ``segments`` (``spb2_jax.ops.segments.Segments``, built once per forward). Per op:

- ``"xla"``: chunked recurrences (``chunk_gated_delta_rule``, ``chunk_gla``), blockwise sliding-window
  attention, blockwise MoBA and tiled full causal attention; time and memory linear in T (attention memory).
- ``"pallas"``: the Pallas kernels of ``pallas_kernels`` (block-sparse flash attention for full causal,
  sliding-window and MoBA attention, forward and backward; the chunked gated-delta-rule forward, differentiated
  through the XLA path), with the record's target / interpret / MoBA algorithm.
- ``"reference"``: per-token ``lax.scan`` recurrences and dense ``[T, T]`` masks; the readable ground truth
  that the fast paths are tested against.

With ``kernels.sequence_shards > 1`` each op runs sequence-parallel: ``spb2_jax.parallel.sequence`` wraps the
same routed op (with ``sequence_shards = 1``) in ``shard_map`` over the mesh axis ``sequence``.
"""

from __future__ import annotations

import dataclasses

import jax

from spb2_jax.ops.attention import attention_reference
from spb2_jax.ops.gdn_chunked import chunk_gated_delta_rule
from spb2_jax.ops.gla_chunked import chunk_gla
from spb2_jax.ops.moba import moba_attention_reference
from spb2_jax.ops.moba_blockwise import causal_attention, moba_attention
from spb2_jax.ops.recurrent import gated_delta_rule_reference, gla_reference
from spb2_jax.ops.segments import Segments
from spb2_jax.ops.swa_blockwise import sliding_window_attention
from spb2_jax.options import Kernels
from spb2_jax.parallel import sequence


def _local(kernels: Kernels) -> Kernels:
    return dataclasses.replace(kernels, sequence_shards=1)


def _attention_kw(kernels: Kernels, impl: str) -> dict:
    kw = dict(impl=impl, block_size=kernels.block_size)
    return kw | kernels.pallas_args if impl == "pallas" else kw


def full_attention(q, k, v, *, segments: Segments, kernels: Kernels) -> jax.Array:
    """Causal GQA attention inside segments."""
    if kernels.sequence_shards > 1:
        return sequence.causal_ring_attention(q, k, v, segments=segments, shards=kernels.sequence_shards,
                                              tile=kernels.block_size)
    if kernels.attention == "reference":
        return attention_reference(q, k, v, segment_ids=segments, causal=True)
    return causal_attention(q, k, v, segment_ids=segments, **_attention_kw(kernels, kernels.attention))


def window_attention(q, k, v, *, window: int | None, segments: Segments, kernels: Kernels) -> jax.Array:
    """Causal sliding-window GQA attention (``window=None``: full causal, routed as ``full_attention``)."""
    if window is None:
        return full_attention(q, k, v, segments=segments, kernels=kernels)
    if kernels.sequence_shards > 1:
        return sequence.window_attention(lambda q, k, v, segments: window_attention(
            q, k, v, window=window, segments=segments, kernels=_local(kernels)), q, k, v, window=window,
            segments=segments, shards=kernels.sequence_shards)
    if kernels.window == "reference":
        return attention_reference(q, k, v, segment_ids=segments, causal=True, window=window)
    return sliding_window_attention(q, k, v, window=window, segment_ids=segments,
                                    **_attention_kw(kernels, kernels.window))


def moba(q, k, v, *, chunk_size: int, topk: int, segments: Segments, kernels: Kernels) -> jax.Array:
    """MoBA block-sparse attention."""
    if kernels.sequence_shards > 1:
        return sequence.moba_ring_attention(q, k, v, chunk_size=chunk_size, topk=topk, segments=segments,
                                            shards=kernels.sequence_shards, tile=kernels.block_size)
    if kernels.moba == "reference":
        return moba_attention_reference(q, k, v, chunk_size=chunk_size, topk=topk, segment_ids=segments)
    kw = _attention_kw(kernels, kernels.moba)
    if kernels.moba == "pallas":
        kw["algorithm"] = kernels.moba_algorithm
    return moba_attention(q, k, v, chunk_size=chunk_size, topk=topk, segment_ids=segments, **kw)


def gated_delta_rule(q, k, v, g, beta, *, initial_state=None, segments: Segments, kernels: Kernels,
                     use_qk_l2norm: bool = True):
    """Gated delta rule -> ``(o, final_state)``."""
    if kernels.sequence_shards > 1:
        return sequence.linear_recurrence(
            lambda q, k, v, g, beta, initial_state, segments: gated_delta_rule(
                q, k, v, g, beta, initial_state=initial_state, segments=segments, kernels=_local(kernels),
                use_qk_l2norm=use_qk_l2norm),
            q, k, v, (g, beta), initial_state=initial_state, segments=segments, diagonal=False,
            shards=kernels.sequence_shards)
    kw = dict(initial_state=initial_state, segment_ids=segments, use_qk_l2norm=use_qk_l2norm)
    if kernels.gdn == "reference":
        return gated_delta_rule_reference(q, k, v, g, beta, **kw)
    if kernels.gdn == "pallas":
        kw |= kernels.pallas_args
    return chunk_gated_delta_rule(q, k, v, g, beta, impl=kernels.gdn, chunk_size=kernels.chunk_size, **kw)


def gla(q, k, v, gk, *, initial_state=None, segments: Segments, kernels: Kernels):
    """Gated linear attention -> ``(o, final_state)``."""
    if kernels.sequence_shards > 1:
        return sequence.linear_recurrence(
            lambda q, k, v, gk, initial_state, segments: gla(
                q, k, v, gk, initial_state=initial_state, segments=segments, kernels=_local(kernels)),
            q, k, v, (gk,), initial_state=initial_state, segments=segments, diagonal=True,
            shards=kernels.sequence_shards)
    if kernels.gla == "reference":
        return gla_reference(q, k, v, gk, initial_state=initial_state, segment_ids=segments)
    if kernels.gla != "xla":
        raise ValueError(f"GLA has no {kernels.gla!r} implementation (resolve_options routes it to 'xla')")
    return chunk_gla(q, k, v, gk, initial_state=initial_state, segment_ids=segments, chunk_size=kernels.chunk_size)
