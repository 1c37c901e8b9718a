"""The one place where a token-mixing op is routed to an implementation.

``impl`` (a static string, chosen once per model call):
- ``"xla"`` (default): chunked recurrences (``chunk_gated_delta_rule``, ``chunk_gla``), blockwise sliding-window
  attention, blockwise MoBA and tiled full causal attention; time and memory linear in T (attention memory).
- ``"pallas"``: the Pallas kernels of ``pallas_kernels`` (block-sparse flash attention for full causal,
  sliding-window and MoBA attention, forward and backward; the chunked gated-delta-rule forward, differentiated
  through the XLA path). GPU-style kernels lowered through Triton on GPU, TPU-style twins through Mosaic on TPU
  (``pallas_kernels.platform``), ``interpret=True`` on CPU. GLA has no kernel and uses the XLA
  chunked path; the GDN kernel is float32-only, so float64 inputs (``jax_enable_x64`` tests) take the XLA path.
- ``"reference"``: per-token ``lax.scan`` recurrences and dense ``[T, T]`` masks; the readable ground truth
  that the fast paths are tested against.
"""

from __future__ import annotations

import jax

from spb2_jax.ops.attention import attention_reference
from spb2_jax.ops.gdn_chunked import chunk_gated_delta_rule
from spb2_jax.ops.gla_chunked import chunk_gla
from spb2_jax.ops.moba import moba_attention_reference
from spb2_jax.ops.moba_blockwise import causal_attention, moba_attention
from spb2_jax.ops.recurrent import gated_delta_rule_reference, gla_reference
from spb2_jax.ops.swa_blockwise import sliding_window_attention

IMPLS = ("reference", "xla", "pallas")
DEFAULT_IMPL = "xla"


def check_impl(impl: str) -> str:
    """Validate an ``impl`` name (``ValueError`` naming it otherwise)."""
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r} is not one of {IMPLS}")
    return impl


def full_attention(q, k, v, *, segment_ids, impl: str = DEFAULT_IMPL) -> jax.Array:
    """Causal GQA attention inside segments."""
    if check_impl(impl) == "reference":
        return attention_reference(q, k, v, segment_ids=segment_ids, causal=True)
    return causal_attention(q, k, v, segment_ids=segment_ids, impl=impl)


def window_attention(q, k, v, *, window: int | None, segment_ids, impl: str = DEFAULT_IMPL) -> jax.Array:
    """Causal sliding-window GQA attention (``window=None``: full causal)."""
    if check_impl(impl) == "reference":
        return attention_reference(q, k, v, segment_ids=segment_ids, causal=True, window=window)
    if window is None:
        return causal_attention(q, k, v, segment_ids=segment_ids, impl=impl)
    return sliding_window_attention(q, k, v, window=window, segment_ids=segment_ids, impl=impl)


def moba(q, k, v, *, chunk_size: int, topk: int, segment_ids, impl: str = DEFAULT_IMPL) -> jax.Array:
    """MoBA block-sparse attention."""
    if check_impl(impl) == "reference":
        return moba_attention_reference(q, k, v, chunk_size=chunk_size, topk=topk, segment_ids=segment_ids)
    return moba_attention(q, k, v, chunk_size=chunk_size, topk=topk, segment_ids=segment_ids, impl=impl)


def gated_delta_rule(q, k, v, g, beta, *, initial_state=None, segment_ids=None, use_qk_l2norm=True,
                     impl: str = DEFAULT_IMPL):
    """Gated delta rule -> ``(o, final_state)``."""
    kw = dict(initial_state=initial_state, segment_ids=segment_ids, use_qk_l2norm=use_qk_l2norm)
    if check_impl(impl) == "reference":
        return gated_delta_rule_reference(q, k, v, g, beta, **kw)
    return chunk_gated_delta_rule(q, k, v, g, beta, impl=impl, **kw)


def gla(q, k, v, gk, *, initial_state=None, segment_ids=None, impl: str = DEFAULT_IMPL):
    """Gated linear attention -> ``(o, final_state)`` (``"pallas"``: no GLA kernel, the XLA chunked path)."""
    fn = gla_reference if check_impl(impl) == "reference" else chunk_gla
    return fn(q, k, v, gk, initial_state=initial_state, segment_ids=segment_ids)
