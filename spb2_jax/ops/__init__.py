"""Token-mixing and normalisation ops in pure ``jax.numpy`` (reference implementations, readable first)."""

from spb2_jax.ops.attention import attention_mask, attention_reference, dot_product_attention
from spb2_jax.ops.moba import moba_attention_reference, moba_selection
from spb2_jax.ops.segments import segment_labels, segment_positions
from spb2_jax.ops.norms import gated_rms_norm, l2_norm, rms_norm
from spb2_jax.ops.recurrent import gated_delta_rule_reference, gla_reference
from spb2_jax.ops.rope import apply_rope, rope_cos_sin
from spb2_jax.ops.sse import sse_aux_loss, sse_gdn_reference, sse_gla_reference, sse_route, topk_mask

__all__ = [
    "apply_rope", "attention_mask", "attention_reference", "dot_product_attention", "gated_delta_rule_reference",
    "gated_rms_norm", "gla_reference", "l2_norm", "moba_attention_reference", "moba_selection", "rms_norm",
    "rope_cos_sin", "segment_labels", "segment_positions", "sse_aux_loss", "sse_gdn_reference", "sse_gla_reference", "sse_route",
    "topk_mask",
]
