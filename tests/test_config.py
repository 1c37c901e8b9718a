"""SpB2Config loads every official config and rejects bad combinations with one ValueError naming the field."""

from __future__ import annotations

import copy
import json

import pytest

from spb2_jax.config import LayerKind, SpB2Config
from tests.helpers import FIXTURES, REPO, fixture_dir

PRESETS = sorted((REPO / "configs").glob("*.json"))


def _tiny() -> dict:
    return json.loads((fixture_dir("tiny") / "config.json").read_text())


@pytest.mark.parametrize("name", FIXTURES)
def test_fixture_configs_load_and_roundtrip(name):
    raw = json.loads((fixture_dir(name) / "config.json").read_text())
    config = SpB2Config.from_dict(raw)
    again = SpB2Config.from_dict(json.loads(config.to_json_string()))
    assert again == config
    for key, value in raw.items():  # nothing the official file says is lost or changed on export
        exported = again.to_dict()[key]
        if key == "attn":
            for k, v in value.items():
                assert exported[k] == v, (k, exported[k], v)
        else:
            assert exported == value, (key, exported, value)


@pytest.mark.parametrize("path", PRESETS, ids=[p.stem for p in PRESETS])
def test_presets_load_and_roundtrip(path):
    config = SpB2Config.from_json_file(path)
    again = SpB2Config.from_dict(json.loads(config.to_json_string()))
    assert again == config and hash(again) == hash(config)  # hashable: a static argument of jitted functions


def test_5b_presets_have_the_official_shape():
    expected = {"spb2-5b-cpt": (512, 4), "spb2-5b-64k": (1024, 8), "spb2-5b-256k": (4096, 12),
                "spb2-5b-sft": (4096, 12)}
    for name, (chunk, topk) in expected.items():
        c = SpB2Config.from_json_file(REPO / "configs" / f"{name}.json")
        assert (c.attn.moba_chunk_size, c.attn.moba_topk) == (chunk, topk)
        assert (c.num_hidden_layers, c.hidden_size, c.vocab_size, c.head_dim) == (36, 2560, 151936, 128)
        assert (c.attn.num_heads, c.attn.kv_heads, c.attn.window_size) == (32, 8, 128)
        kinds = c.layer_kinds
        assert [i for i, k in enumerate(kinds) if k == LayerKind.MOBA] == [0, 1, 2, 3, 6, 12, 17, 21, 24]
        assert [i for i, k in enumerate(kinds) if k == LayerKind.FULL] == [35]
        assert (c.num_sparse_partition, c.num_writer, c.num_reader) == (4, 2, 2)


def test_layer_kinds_of_the_fixtures():
    assert SpB2Config.from_dict(_tiny()).layer_kinds == (
        LayerKind.MOBA, LayerKind.SSE_GDN, LayerKind.MOBA, LayerKind.SSE_GDN, LayerKind.SSE_GDN, LayerKind.FULL)
    gla = json.loads((fixture_dir("tiny-gla") / "config.json").read_text())
    assert SpB2Config.from_dict(gla).layer_kinds[1] == LayerKind.SSE_GLA


def _with(changes: dict, attn: dict | None = None) -> dict:
    d = copy.deepcopy(_tiny())
    d.update(changes)
    if attn:
        d["attn"].update(attn)
    return d


BAD = {  # id: field named in the error, top-level changes, attn changes, a value the error shows
    "linear_attn_type-mamba": ("linear_attn_type", {"linear_attn_type": "mamba"}, None, "'mamba'"),
    "num_writer-4-of-4": ("num_writer", {"num_writer": 4, "num_reader": 4}, None, "4"),
    "num_reader-5-of-4": ("num_reader", {"num_reader": 5, "sse_implementation": "mask"}, None, "5"),
    "num_reader-ne-writers-varlen": ("num_reader", {"num_reader": 1, "num_writer": 2, "sse_implementation": "varlen"},
                                     None, "varlen"),
    "attn.layers-past-the-last": ("attn.layers", {}, {"layers": [0, 2, 6], "full_layers": []}, "6"),
    "attn.full_layers-past-the-last": ("attn.full_layers", {}, {"full_layers": [9]}, "9"),
    "attn.full_layers-not-attention": ("attn.full_layers", {}, {"full_layers": [4]}, "not in attn.layers"),
    "attn.num_kv_heads-not-a-divisor": ("attn.num_kv_heads", {}, {"num_kv_heads": 3}, "3"),
    "attn.num_kv_heads-heads-differ": ("attn.num_kv_heads", {"num_heads": 3}, {"num_heads": 4, "num_kv_heads": 2},
                                       "num_heads=3"),
    "sse_implementation-dense": ("sse_implementation", {"sse_implementation": "dense"}, None, "'dense'"),
    "hidden_size-0": ("hidden_size", {"hidden_size": 0}, None, "0"),
    "num_v_heads-8": ("num_v_heads", {"num_v_heads": 8}, None, "8"),
    "use_short_conv-true": ("use_short_conv", {"use_short_conv": True}, None, "True"),
    "attn.window_size-negative": ("attn.window_size", {}, {"window_size": -1}, "-1"),
}


@pytest.mark.parametrize("field,changes,attn,shows", BAD.values(), ids=BAD.keys())
def test_invalid_config_names_field_and_value(field, changes, attn, shows):
    with pytest.raises(ValueError) as err:
        SpB2Config.from_dict(_with(changes, attn))
    msg = str(err.value)
    assert field in msg and shows in msg, msg


def test_mask_form_allows_readers_different_from_writers():
    c = SpB2Config.from_dict(_with({"sse_implementation": "mask", "num_reader": 1}))
    assert (c.num_reader, c.num_writer) == (1, 2)


def test_layer_index_outside_model_in_layer_kind():
    c = SpB2Config.from_dict(_tiny())
    with pytest.raises(ValueError, match="layer_idx=6"):
        c.layer_kind(6)


def test_missing_attn_and_unknown_attn_key():
    d = _tiny()
    del d["attn"]
    with pytest.raises(ValueError, match="attn"):
        SpB2Config.from_dict(d)
    with pytest.raises(ValueError, match="moba_block"):
        SpB2Config.from_dict(_with({}, {"moba_block": 3}))


def test_wrong_model_type():
    with pytest.raises(ValueError, match="model_type='llama'"):
        SpB2Config.from_dict(_with({"model_type": "llama"}))


def test_default_intermediate_size_follows_official_rounding():
    c = SpB2Config.from_dict(_with({"intermediate_size": None, "hidden_size": 96}))
    assert c.mlp_intermediate_size == 256  # int(96 * 4 * 2 / 3) = 256 -> multiple of 256
    c = SpB2Config.from_dict(_with({"intermediate_size": None, "hidden_size": 2560}))
    assert c.mlp_intermediate_size == 6912  # int(6826.67) = 6826 -> rounded up to 27 * 256
