"""Qwen3 checkpoints load as all-full-attention SpB2 models and equal HF ``Qwen3ForCausalLM`` (the T2H teacher).

Ground truth: ``../shared/fixtures/qwen3/tiny`` (HF transformers 5.23, float32 CPU, O(1)-scale random weights):
logits and every hidden state within 1e-4 absolute (the issue's bound; measured 1.6e-5 on logits of magnitude 20).
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import spb2_jax
from spb2_jax.checkpoint import load_qwen3, qwen3_config, save_qwen3
from spb2_jax.checkpoint.hf import read_safetensors_header
from spb2_jax.checkpoint.qwen3 import qwen3_name, spb2_name
from spb2_jax.model import SpB2ForCausalLM
from tests.helpers import qwen3_fixture_dir

ATOL = 1e-4


def _fixture_config() -> dict:
    return json.loads((qwen3_fixture_dir() / "config.json").read_text())


def test_load_qwen3_equals_hf_qwen3_logits_and_every_hidden_state():
    path = qwen3_fixture_dir()
    config, params = load_qwen3(path, progress=False)
    assert config.layer_kinds == ("full",) * 4 and config.attn.rope_theta == 1e6 and config.attn.kv_heads == 2
    ids = np.load(path / "inputs.npz")["input_ids"]
    want = np.load(path / "outputs.npz")
    out = SpB2ForCausalLM(config).apply({"params": params}, jnp.asarray(ids), None, output_hidden_states=True)
    np.testing.assert_allclose(np.asarray(out.logits), want["logits"], rtol=0, atol=ATOL)
    assert len(out.hidden_states) == want["hidden_states"].shape[0]
    for i, h in enumerate(out.hidden_states):
        np.testing.assert_allclose(np.asarray(h), want["hidden_states"][i], rtol=0, atol=ATOL, err_msg=f"hidden {i}")


def test_load_pretrained_recognises_a_qwen3_checkpoint():
    path = qwen3_fixture_dir()
    model = spb2_jax.load_pretrained(path)
    assert model.config.layer_kinds == ("full",) * 4
    ids = np.load(path / "inputs.npz")["input_ids"]
    np.testing.assert_allclose(np.asarray(model(ids).logits), np.load(path / "outputs.npz")["logits"], rtol=0,
                               atol=ATOL)


def test_save_qwen3_round_trips_names_config_and_bits(tmp_path):
    src = qwen3_fixture_dir()
    config, params = load_qwen3(src, progress=False)
    save_qwen3(config, params, tmp_path / "out", progress=False)
    assert sorted(read_safetensors_header(tmp_path / "out" / "model.safetensors")) == \
        sorted(read_safetensors_header(src / "model.safetensors"))
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert qwen3_config(written) == config
    _, again = load_qwen3(tmp_path / "out", progress=False)
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(again)):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(FileExistsError, match="already holds a checkpoint"):
        save_qwen3(config, params, tmp_path / "out", progress=False)


@pytest.mark.parametrize("name", ["model.embed_tokens.weight", "model.layers.3.input_layernorm.weight",
                                  "model.layers.0.post_attention_layernorm.weight",
                                  "model.layers.12.self_attn.k_norm.weight", "model.layers.1.mlp.up_proj.weight",
                                  "model.norm.weight", "lm_head.weight"])
def test_qwen3_names_are_a_bijection(name):
    assert qwen3_name(spb2_name(name)) == name


@pytest.mark.parametrize("change, field", [
    ({"attention_bias": True}, "attention_bias"),
    ({"use_sliding_window": True}, "use_sliding_window"),
    ({"layer_types": ["full_attention", "sliding_attention", "full_attention", "full_attention"]}, "layer_types"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}}, "rope_parameters.rope_type"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"model_type": "qwen3_moe"}, "model_type"),
])
def test_unrepresentable_qwen3_configs_name_the_field(change, field):
    d = dict(_fixture_config(), **change)
    with pytest.raises(ValueError, match=f"unsupported Qwen3 config: {field}="):
        qwen3_config(d)


def test_older_qwen3_configs_with_top_level_rope_theta():
    d = _fixture_config()
    del d["rope_parameters"]
    d["rope_theta"] = 5e6
    assert qwen3_config(d).attn.rope_theta == 5e6
