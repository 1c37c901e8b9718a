"""SpB2.0-VL checkpoints (``model_type == "spb2_vl"``): the text stack's config and tensor names.

The VL text stack is the LLM's hybrid stack with the official VL module names (``model.language_model.*``,
``self_attn``, ``input_layernorm`` / ``post_attention_layernorm``, ``embed_tokens``, ``fp32_params.A_log``) and
an interleaved M-RoPE (``text_config.mrope_section``) whose theta is ``text_config.rope_theta``.
"""

from __future__ import annotations

import json
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


def vision_abstract_params(vision) -> dict:
    """``{flax path: ShapeDtypeStruct}`` of the vision tower's params (nothing allocated)."""
    import jax
    import jax.numpy as jnp
    from flax import traverse_util
    from flax.linen import meta

    from spb2_jax.vision.tower import VisionTower

    n = vision.spatial_merge_size ** 2  # one merge window
    args = (jnp.zeros((n, vision.patch_dim)), jnp.zeros((n, 4), jnp.int32), jnp.zeros((n, 4)),
            jnp.zeros((n, vision.head_dim // 2)), jnp.zeros((n,), jnp.int32))
    boxed = jax.eval_shape(lambda: VisionTower(vision).init(jax.random.key(0), *args))
    return traverse_util.flatten_dict(meta.unbox(boxed)["params"])


def load_vl(path, dtype: Any = None, *, strict: bool = True, progress: bool = True) -> tuple[Any, Any]:
    """``(VLConfig, params)`` of an ``spb2_vl`` checkpoint directory: the text stack under ``model`` (and
    ``lm_head`` when untied), the vision tower under ``visual``. Problems (missing, wrongly shaped, and with
    ``strict`` unexpected tensors) are listed in one ``CheckpointError``."""
    import os

    import jax.numpy as jnp
    import numpy as np
    from flax import traverse_util

    from spb2_jax.checkpoint.hf import (CheckpointError, _tensor_infos, _weight_files, hf_param_spec, read_params,
                                        read_tensor)
    from spb2_jax.vision import names
    from spb2_jax.vision.config import VLConfig

    path = os.fspath(path)
    with open(os.path.join(path, "config.json")) as f:
        config = VLConfig.from_dict(json.load(f))
    infos = _tensor_infos(_weight_files(path))
    vision = {p: a for p, a in vision_abstract_params(config.vision).items()}
    vision_names = {names.hf_name(p): p for p in vision}
    text_names = {vl_text_name(n) for n in hf_param_spec(config.text)} | {"lm_head.weight"}
    problems = []
    for hf, p in sorted(vision_names.items()):
        want = vision[p].shape
        if hf not in infos:
            problems.append(f"  missing:     {hf}")
        elif int(np.prod(infos[hf].shape)) != int(np.prod(want)):
            problems.append(f"  wrong shape: {hf} (found {list(infos[hf].shape)}, the vision config needs "
                            f"{int(np.prod(want))} values as {list(want)})")
    if strict:
        problems += [f"  unexpected:  {n}" for n in sorted(set(infos) - set(vision_names) - text_names)]
    if problems:
        raise CheckpointError(f"{path}: the VL checkpoint does not match its config ({len(problems)} problems):\n"
                              + "\n".join(problems))
    params = read_params(path, config.text, rename=spb2_text_name, dtype=dtype, strict=False, progress=progress)
    flat = {}
    for hf, p in vision_names.items():
        with open(infos[hf].file, "rb", buffering=0) as f:
            array = names.to_flax(p, read_tensor(f, infos[hf]))
        flat[p] = jnp.asarray(array, dtype=dtype or array.dtype)
    return config, dict(params, visual=traverse_util.unflatten_dict(flat))


def save_vl(config, params: Any, path, *, overwrite: bool = False, progress: bool = True,
            max_shard_size: int | str = "5GB") -> list[str]:
    """Write an ``spb2_vl`` checkpoint the official code loads (names of ``load_vl``, ``config.to_dict()``)."""
    import jax
    import numpy as np
    from flax import traverse_util

    from spb2_jax.checkpoint.hf import save_hf
    from spb2_jax.vision import names

    text = {k: v for k, v in params.items() if k != "visual"}
    conv = (config.vision.hidden_size, config.vision.in_channels, config.vision.temporal_patch_size,
            config.vision.patch_size, config.vision.patch_size)
    extra = [(names.hf_name(p), np.ascontiguousarray(names.to_hf(p, np.asarray(jax.device_get(v)), conv)))
             for p, v in sorted(traverse_util.flatten_dict(params["visual"]).items())]
    return save_hf(config.text, text, path, overwrite=overwrite, progress=progress, rename=vl_text_name,
                   config_json=json.dumps(config.to_dict(), indent=2, sort_keys=True) + "\n", extra=extra,
                   max_shard_size=max_shard_size)
