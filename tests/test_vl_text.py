"""The VL text stack (the LLM's layers with M-RoPE and the official bf16 q/k rounding), teacher-forced against the
official tiny-vl fixture: each decoder layer fed ``layer_inputs[i]`` gives ``attn_outputs[i]`` and
``layer_outputs[i]``."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest

from spb2_jax.checkpoint.hf import read_params
from spb2_jax.checkpoint.vl import spb2_text_name, vl_text_config, vl_text_name
from spb2_jax.layers.block import DecoderBlock
from spb2_jax.model import build_segments
from spb2_jax.options import resolve_options
from tests.helpers import SHARED

VL = SHARED / "fixtures" / "official-vl" / "tiny-vl"


@pytest.fixture(scope="module")
def text():
    if not (VL / "outputs.npz").is_file():
        raise FileNotFoundError(f"VL fixture not found at {VL}: the tests need ../shared beside the repository")
    config = vl_text_config(json.loads((VL / "config.json").read_text()))
    params = read_params(VL, config, rename=spb2_text_name, strict=False, progress=False)  # + vision tensors
    return config, params, np.load(VL / "inputs.npz"), np.load(VL / "outputs.npz")


def test_teacher_forced_layers_match_the_official_float32_model(text):
    """Pure float32 (``official_qk_bf16`` off): layer i fed the official input of layer i (the previous layer's
    ``layer_outputs_nobf16`` plus the deepstack features on the image tokens for i <= 3) gives
    ``layer_outputs_nobf16[i]`` within 1e-5."""
    config, params, i, o = text
    opts = resolve_options(config, official_qk_bf16=False)
    ids = jnp.asarray(i["input_ids"])
    seg = build_segments(ids, jnp.asarray(i["attention_mask"]), None)
    seg = seg.replace(mrope=jnp.asarray(np.transpose(i["position_ids"], (1, 2, 0)), jnp.int32))
    real = i["attention_mask"][0] == 1
    image = i["input_ids"][0] == 393
    for layer in range(config.num_hidden_layers):
        if layer == 0:
            x = o["layer_inputs"][0].copy()  # the embeddings after the image merge (no q/k involved yet)
        else:
            x = o["layer_outputs_nobf16"][layer - 1].copy()
            if layer - 1 < len(o["deepstack_embeds"]):
                x[0, image] += o["deepstack_embeds"][layer - 1]
        out, _, _, _ = DecoderBlock(config, layer, opts).apply(
            {"params": params["model"][f"layers_{layer}"]}, jnp.asarray(x), seg)
        np.testing.assert_allclose(np.asarray(out)[0, real], o["layer_outputs_nobf16"][layer][0, real], rtol=0,
                                   atol=1e-5, err_msg=f"layer {layer}")


def test_vl_text_names_round_trip():
    from spb2_jax.checkpoint.hf import hf_param_spec

    config = vl_text_config(json.loads((VL / "config.json").read_text()))
    for name in hf_param_spec(config):
        assert spb2_text_name(vl_text_name(name)) == name and vl_text_name(name).startswith("model.language_model.")
