"""Qwen3 checkpoints as all-full-attention SpB2 models: the teacher of Transformer-to-Hybrid conversion.

A Qwen3 decoder layer is a SpB2 full-attention layer with q/k RMSNorm per head, NeoX rotary embeddings and the
same gated SiLU MLP, so a Qwen3 checkpoint loads into ``SpB2ForCausalLM`` with an all-full ``attn`` config and
runs on the same kernels and sharding rules. Only the tensor names differ:

    Qwen3                                           SpB2
    model.embed_tokens.weight                       model.embeddings.weight
    model.layers.i.input_layernorm.weight           model.layers.i.attn_norm.weight
    model.layers.i.post_attention_layernorm.weight  model.layers.i.mlp_norm.weight
    model.layers.i.self_attn.{q,k,v,o}_proj / {q,k}_norm  model.layers.i.attn.<same>
    (mlp.*, model.norm.weight, lm_head.weight are the same)

Qwen3 configs with no SpB2 counterpart (attention / o_proj biases, sliding-window layers, rope scaling, another
activation) raise ``ValueError`` naming the field.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Mapping

from spb2_jax.checkpoint.hf import CONFIG_FILE, read_params, save_hf
from spb2_jax.config import AttnConfig, SpB2Config

QWEN3_MODEL_TYPE = "qwen3"

# (qwen3 pattern, spb2 replacement), applied in order, first match wins
_TO_SPB2 = (
    (re.compile(r"^model\.embed_tokens\.weight$"), "model.embeddings.weight"),
    (re.compile(r"^model\.layers\.(\d+)\.input_layernorm\.weight$"), r"model.layers.\1.attn_norm.weight"),
    (re.compile(r"^model\.layers\.(\d+)\.post_attention_layernorm\.weight$"), r"model.layers.\1.mlp_norm.weight"),
    (re.compile(r"^model\.layers\.(\d+)\.self_attn\."), r"model.layers.\1.attn."),
)
_TO_QWEN3 = (
    (re.compile(r"^model\.embeddings\.weight$"), "model.embed_tokens.weight"),
    (re.compile(r"^model\.layers\.(\d+)\.attn_norm\.weight$"), r"model.layers.\1.input_layernorm.weight"),
    (re.compile(r"^model\.layers\.(\d+)\.mlp_norm\.weight$"), r"model.layers.\1.post_attention_layernorm.weight"),
    (re.compile(r"^model\.layers\.(\d+)\.attn\."), r"model.layers.\1.self_attn."),
)


def _rename(name: str, rules) -> str:
    for pattern, replacement in rules:
        if pattern.search(name):
            return pattern.sub(replacement, name)
    return name


def spb2_name(qwen3_name: str) -> str:
    """``model.layers.3.self_attn.q_proj.weight`` -> ``model.layers.3.attn.q_proj.weight`` (others unchanged)."""
    return _rename(qwen3_name, _TO_SPB2)


def qwen3_name(spb2_name_: str) -> str:
    """The inverse of ``spb2_name``."""
    return _rename(spb2_name_, _TO_QWEN3)


def _bad(field: str, value: Any, why: str) -> None:
    raise ValueError(f"unsupported Qwen3 config: {field}={value!r}: {why}")


def qwen3_config(d: Mapping[str, Any]) -> SpB2Config:
    """The all-full-attention ``SpB2Config`` equal to a Qwen3 ``config.json`` dict.

    Raises ``ValueError`` naming the field for what SpB2 layers cannot represent.
    """
    if d.get("model_type") != QWEN3_MODEL_TYPE:
        _bad("model_type", d.get("model_type"), f"expected {QWEN3_MODEL_TYPE!r}")
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size"):
        if key not in d:
            _bad(key, None, "is required")
    if d.get("hidden_act", "silu") not in ("silu", "swish"):
        _bad("hidden_act", d.get("hidden_act"), "SpB2's gated MLP uses SiLU")
    if d.get("attention_bias", False):
        _bad("attention_bias", True, "Qwen3's biases include o_proj, which SpB2 attention does not have")
    if d.get("use_sliding_window", False):
        _bad("use_sliding_window", True, "sliding-window Qwen3 layers are not full-attention layers")
    layers = int(d["num_hidden_layers"])
    types = d.get("layer_types") or ["full_attention"] * layers
    odd = sorted({t for t in types if t != "full_attention"})
    if odd or len(types) != layers:
        _bad("layer_types", types, f"every one of the {layers} layers must be 'full_attention'")
    rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        _bad("rope_parameters.rope_type", rope_type, "only unscaled rotary embeddings ('default') are supported")
    theta = rope.get("rope_theta", d.get("rope_theta", 10000.0))
    heads = int(d["num_attention_heads"])
    kv = int(d.get("num_key_value_heads") or heads)
    head_dim = int(d.get("head_dim") or d["hidden_size"] // heads)
    attn = AttnConfig(layers=tuple(range(layers)), num_heads=heads, full_layers=tuple(range(layers)),
                      num_kv_heads=kv, qk_norm=True, qkv_bias=False, rope_theta=float(theta), window_size=None)
    return SpB2Config(
        attn=attn, vocab_size=int(d["vocab_size"]), hidden_size=int(d["hidden_size"]), num_hidden_layers=layers,
        num_heads=heads, head_dim=head_dim, intermediate_size=int(d["intermediate_size"]), hidden_act="swish",
        norm_eps=float(d.get("rms_norm_eps", 1e-6)), swa_dropout=0.0,
        max_position_embeddings=int(d.get("max_position_embeddings", 2048)),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        initializer_range=float(d.get("initializer_range", 0.02)), pad_token_id=d.get("pad_token_id"),
        bos_token_id=d.get("bos_token_id"), eos_token_id=_eos(d.get("eos_token_id")), dtype=d.get("dtype"))


def _eos(v):
    return tuple(v) if isinstance(v, list) else v


def qwen3_config_dict(config: SpB2Config) -> dict[str, Any]:
    """The Qwen3 ``config.json`` dict of an all-full-attention ``SpB2Config`` (inverse of ``qwen3_config``)."""
    a = config.attn
    if set(a.full_layers) != set(range(config.num_hidden_layers)) or not a.qk_norm or a.qkv_bias:
        raise ValueError("only an all-full-attention config with attn.qk_norm and no attn.qkv_bias is a Qwen3 model "
                         f"(attn.full_layers={list(a.full_layers)}, qk_norm={a.qk_norm}, qkv_bias={a.qkv_bias})")
    eos = config.eos_token_id
    return {
        "architectures": ["Qwen3ForCausalLM"], "model_type": QWEN3_MODEL_TYPE, "attention_bias": False,
        "attention_dropout": 0.0, "bos_token_id": config.bos_token_id,
        "eos_token_id": list(eos) if isinstance(eos, tuple) else eos, "pad_token_id": config.pad_token_id,
        "head_dim": config.head_dim, "hidden_act": "silu", "hidden_size": config.hidden_size,
        "initializer_range": config.initializer_range, "intermediate_size": config.mlp_intermediate_size,
        "layer_types": ["full_attention"] * config.num_hidden_layers,
        "max_position_embeddings": config.max_position_embeddings, "num_attention_heads": a.num_heads,
        "num_hidden_layers": config.num_hidden_layers, "num_key_value_heads": a.kv_heads,
        "rms_norm_eps": config.norm_eps, "rope_parameters": {"rope_theta": a.rope_theta, "rope_type": "default"},
        "rope_theta": a.rope_theta, "sliding_window": None, "use_sliding_window": False,
        "tie_word_embeddings": config.tie_word_embeddings, "vocab_size": config.vocab_size,
        "dtype": config.dtype or "float32", "use_cache": True,
    }


def checkpoint_model_type(path: str | os.PathLike) -> str | None:
    """``model_type`` of ``<path>/config.json`` (None when absent)."""
    cfg = os.path.join(os.fspath(path), CONFIG_FILE)
    if not os.path.isfile(cfg):
        raise FileNotFoundError(f"no config.json in {os.fspath(path)!r}")
    with open(cfg) as f:
        try:
            return json.load(f).get("model_type")
        except json.JSONDecodeError as e:
            raise ValueError(f"{cfg} is not valid JSON: {e}") from e


def load_qwen3(path: str | os.PathLike, dtype: Any = None, *, strict: bool = True, progress: bool = True,
               shardings: Any = None) -> tuple[SpB2Config, Any]:
    """Load a Qwen3 HF checkpoint directory into ``(all-full SpB2Config, SpB2 params)``.

    Arguments as ``spb2_jax.load_hf`` (``dtype`` casts, ``shardings`` places each tensor on its shards as read).
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint directory {path!r} does not exist")
    with open(os.path.join(path, CONFIG_FILE)) as f:
        config = qwen3_config(json.load(f))
    return config, read_params(path, config, rename=spb2_name, dtype=dtype, strict=strict, progress=progress,
                               shardings=shardings)


def save_qwen3(config: SpB2Config, params: Any, path: str | os.PathLike, *, overwrite: bool = False,
               progress: bool = True) -> list[str]:
    """Write an all-full-attention SpB2 model as a Qwen3 HF checkpoint (``Qwen3ForCausalLM`` loads it)."""
    text = json.dumps(qwen3_config_dict(config), indent=2, sort_keys=True) + "\n"
    return save_hf(config, params, path, overwrite=overwrite, progress=progress, rename=qwen3_name,
                   config_json=text)
