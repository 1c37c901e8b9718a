"""SpB2.0-VL checkpoints (``model_type == "spb2_vl"``): the text stack's config and tensor names.

The VL text stack is the LLM's hybrid stack with the official VL module names (``model.language_model.*``,
``self_attn``, ``input_layernorm`` / ``post_attention_layernorm``, ``embed_tokens``, ``fp32_params.A_log``) and
an interleaved M-RoPE (``text_config.mrope_section``) whose theta is ``text_config.rope_theta``.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

from spb2_jax.config import MODEL_TYPE, SpB2Config

VL_MODEL_TYPE = "spb2_vl"


def vl_text_config(d: Mapping[str, Any]) -> SpB2Config:
    """The text stack's ``SpB2Config`` of a VL ``config.json`` dict (errors name the field)."""
    if d.get("model_type") != VL_MODEL_TYPE:
        raise ValueError(f"model_type={d.get('model_type')!r}: not a VL checkpoint (expected {VL_MODEL_TYPE!r})")
    text = d.get("text_config")
    if not isinstance(text, Mapping):
        raise ValueError("text_config is required in a VL config.json")
    if "mrope_section" not in text:
        raise ValueError("text_config.mrope_section is required (the interleaved M-RoPE of every text layer)")
    t = dict(text, model_type=MODEL_TYPE)
    t["attn"] = dict(t["attn"], rope_theta=text.get("rope_theta", t["attn"].get("rope_theta")))  # quirk: text theta
    t["tie_word_embeddings"] = bool(text.get("tie_word_embeddings", d.get("tie_word_embeddings", True)))
    return SpB2Config.from_dict(t)


# (SpB2 LLM name pattern, VL name); applied in order, first match wins
_TO_VL = (
    (r"^model\.embeddings\.weight$", "model.language_model.embed_tokens.weight"),
    (r"^model\.norm\.", "model.language_model.norm."),
    (r"^model\.layers\.(\d+)\.attn_norm\.", r"model.language_model.layers.\1.input_layernorm."),
    (r"^model\.layers\.(\d+)\.mlp_norm\.", r"model.language_model.layers.\1.post_attention_layernorm."),
    (r"^model\.layers\.(\d+)\.attn\.(A_log|dt_bias)$", r"model.language_model.layers.\1.self_attn.fp32_params.\2"),
    (r"^model\.layers\.(\d+)\.attn\.", r"model.language_model.layers.\1.self_attn."),
    (r"^model\.layers\.(\d+)\.mlp\.", r"model.language_model.layers.\1.mlp."),
)
_TO_SPB2 = (
    (r"^model\.language_model\.embed_tokens\.weight$", "model.embeddings.weight"),
    (r"^model\.language_model\.norm\.", "model.norm."),
    (r"^model\.language_model\.layers\.(\d+)\.input_layernorm\.", r"model.layers.\1.attn_norm."),
    (r"^model\.language_model\.layers\.(\d+)\.post_attention_layernorm\.", r"model.layers.\1.mlp_norm."),
    (r"^model\.language_model\.layers\.(\d+)\.self_attn\.fp32_params\.", r"model.layers.\1.attn."),
    (r"^model\.language_model\.layers\.(\d+)\.self_attn\.", r"model.layers.\1.attn."),
    (r"^model\.language_model\.layers\.(\d+)\.mlp\.", r"model.layers.\1.mlp."),
)


def _rename(name: str, rules) -> str:
    for pattern, repl in rules:
        new, n = re.subn(pattern, repl, name)
        if n:
            return new
    return name


def vl_text_name(name: str) -> str:
    """The VL checkpoint's name of a text-stack tensor given its SpB2 LLM name (others unchanged)."""
    return _rename(name, _TO_VL)


def spb2_text_name(name: str) -> str:
    """The inverse of ``vl_text_name``: a VL text tensor's SpB2 LLM name (vision tensors unchanged)."""
    return _rename(name, _TO_SPB2)
