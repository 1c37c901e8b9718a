"""Logical axis names: every parameter of the 5B model has them, the one rules table maps each to mesh axes that
exist, and the model under a mesh with the rules computes the same logits."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from jax.sharding import PartitionSpec

from spb2_jax.checkpoint import load_hf
from spb2_jax.config import SpB2Config
from spb2_jax.model import SpB2ForCausalLM, abstract_params, init_params, logical_axes
from spb2_jax.parallel import MESH_AXES, RULES, mesh_axes_of, use_rules
from tests.conftest import REPO, fixture_dir


@pytest.mark.parametrize("preset", ["spb2-5b-cpt", "tiny-gla"])
def test_every_parameter_has_logical_axes_the_rules_map_to_mesh_axes(preset):
    """Abstract (``jax.eval_shape``): one logical name per dimension of every leaf, each in the rules table,
    mapped to existing mesh axes, no mesh axis used twice in one leaf; the tree is the params tree."""
    config = SpB2Config.from_json_file(REPO / "configs" / f"{preset}.json")
    specs = traverse_util.flatten_dict(logical_axes(config))
    shapes = traverse_util.flatten_dict(abstract_params(config))
    assert specs.keys() == shapes.keys()
    for path, spec in specs.items():
        name = "/".join(path)
        assert isinstance(spec, PartitionSpec), name
        assert len(spec) == len(shapes[path].shape), (name, spec, shapes[path].shape)
        used = []
        for axis in spec:
            assert isinstance(axis, str), (name, spec)  # every dimension is named
            mesh = mesh_axes_of(axis)
            assert set(mesh) <= set(MESH_AXES), (name, axis, mesh)
            used += mesh
        assert len(used) == len(set(used)), (name, spec, used)
    if preset == "spb2-5b-cpt":
        assert specs["model", "embeddings", "embedding"] == PartitionSpec("vocab", "embed")
        assert specs["model", "layers_0", "attn", "q_proj", "kernel"] == PartitionSpec("embed", "q_heads")
        assert specs["model", "layers_4", "attn", "A_log"] == PartitionSpec("gate_heads")


def test_params_are_plain_arrays():
    """``init_params`` and ``load_hf`` return plain arrays (the names live in ``logical_axes``)."""
    config = SpB2Config.from_json_file(REPO / "configs" / "tiny.json")
    for tree in (init_params(config, jax.random.key(0)), load_hf(fixture_dir("tiny"), progress=False)[1]):
        leaves = jax.tree_util.tree_leaves(tree, is_leaf=lambda x: not isinstance(x, dict))
        assert all(isinstance(x, jax.Array) for x in leaves)


def test_rules_name_only_mesh_axes():
    for name, axes in RULES:
        assert set(mesh_axes_of(name)) <= set(MESH_AXES), name
    with pytest.raises(KeyError, match="'nope'"):
        mesh_axes_of("nope")


@pytest.mark.parametrize("fixture", ["tiny", "tiny-gla-mask"])
def test_one_device_mesh_with_the_rules_gives_identical_logits(fixture):
    """Under a 1-device mesh with the axes ``data, fsdp, tensor, sequence`` and the rules, every logical
    constraint becomes a sharding constraint: the compiled program carries them and the logits are equal."""
    config, params = load_hf(fixture_dir(fixture), progress=False)
    inputs = np.load(fixture_dir(fixture) / "inputs.npz")
    ids = jnp.asarray(inputs["input_ids"])
    model = SpB2ForCausalLM(config)
    forward = jax.jit(lambda p, x: model.apply({"params": p}, x).logits)
    plain = forward(params, ids)
    assert "sharding" not in jax.jit(lambda p, x: model.apply({"params": p}, x).logits).lower(params, ids).as_text()
    with pytest.raises(ValueError, match="Explicit"):
        with use_rules(jax.make_mesh((1, 1, 1, 1), MESH_AXES)):
            pass
    mesh = jax.make_mesh((1, 1, 1, 1), MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 4)
    with use_rules(mesh):
        lowered = jax.jit(lambda p, x: model.apply({"params": p}, x).logits).lower(params, ids)
        assert "sharding" in lowered.as_text()  # the constraints are there
        meshed = lowered.compile()(params, ids)
    np.testing.assert_array_equal(np.asarray(meshed), np.asarray(plain))
