"""Token-mixing and normalisation ops in pure ``jax.numpy``.

The fast paths (time and memory linear in T; ``impl="pallas"`` runs the Pallas kernels of ``pallas_kernels``):
``chunk_gated_delta_rule``, ``chunk_gla``, ``moba_attention``, ``sliding_window_attention``,
``causal_attention``. Their readable references (per-token scans, dense masks): ``gated_delta_rule_reference``,
``gla_reference``, ``moba_attention_reference``, ``attention_reference``. ``Segments`` is the segment metadata
every op receives (``segment_ids`` arrays are accepted too). ``spb2_jax.ops.dispatch`` routes the model's calls
by the resolved ``spb2_jax.options.Kernels``.
"""

from spb2_jax.ops.attention import attention_mask, attention_reference, dot_product_attention
from spb2_jax.ops.gdn_chunked import chunk_gated_delta_rule
from spb2_jax.ops.gla_chunked import chunk_gla
from spb2_jax.ops.moba import moba_attention_reference, moba_selection
from spb2_jax.ops.moba_blockwise import causal_attention, moba_attention
from spb2_jax.ops.norms import gated_rms_norm, l2_norm, rms_norm
from spb2_jax.ops.recurrent import gated_delta_rule_reference, gla_reference
from spb2_jax.ops.rope import apply_rope, rope_cos_sin
from spb2_jax.ops.segments import Segments, segment_labels, segment_positions
from spb2_jax.ops.sse import sse_aux_loss, sse_gdn, sse_gdn_reference, sse_gla, sse_gla_reference, sse_route, topk_mask
from spb2_jax.ops.swa_blockwise import sliding_window_attention

__all__ = [
    "Segments", "apply_rope", "attention_mask", "attention_reference", "causal_attention", "chunk_gated_delta_rule",
    "chunk_gla", "dot_product_attention", "gated_delta_rule_reference", "gated_rms_norm", "gla_reference", "l2_norm",
    "moba_attention", "moba_attention_reference", "moba_selection", "rms_norm", "rope_cos_sin", "segment_labels",
    "segment_positions", "sliding_window_attention", "sse_aux_loss", "sse_gdn", "sse_gdn_reference", "sse_gla",
    "sse_gla_reference", "sse_route", "topk_mask",
]
