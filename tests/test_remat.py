"""Remat policies (``ModelOptions.remat``) change what the backward pass stores, never the numbers."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spb2_jax.checkpoint import load_hf
from spb2_jax.config import SpB2Config
from spb2_jax.model import abstract_params, loss_fn
from spb2_jax.options import REMAT_POLICIES, resolve_options
from tests.conftest import REPO, fixture_dir


def _loss_and_grad(config, params, ids, labels, policy, dropout_rng=None):
    options = resolve_options(config, remat=policy)
    fn = lambda p: loss_fn(p, config, ids, labels, options=options, dropout_rng=dropout_rng)[0]  # noqa: E731
    return jax.jit(jax.value_and_grad(fn))(params)


@pytest.fixture(scope="module")
def tiny_step():
    config, params = load_hf(fixture_dir("tiny"), progress=False)
    inputs = np.load(fixture_dir("tiny") / "inputs.npz")
    ids, labels = jnp.asarray(inputs["input_ids"]), jnp.asarray(inputs["labels"])
    config = config.replace(swa_dropout=0.5)  # the dropout draw must be replayed identically by the recompute
    return config, params, ids, labels, _loss_and_grad(config, params, ids, labels, "none", jax.random.key(3))


@pytest.mark.parametrize("policy", [p for p in REMAT_POLICIES if p != "none"])
def test_each_policy_gives_the_same_loss_and_gradients(tiny_step, policy):
    """Recomputation runs the same float32 operations, but XLA fuses (and so sums) them differently: loss and
    gradients agree to float32 reassociation error. Bound: ~1e-7 per op times the depth of the chunked recurrence
    and attention reductions (~1e2) -> 1e-5 relative to each leaf's largest gradient; SWA dropout included."""
    config, params, ids, labels, (loss0, grads0) = tiny_step
    loss, grads = _loss_and_grad(config, params, ids, labels, policy, jax.random.key(3))
    np.testing.assert_allclose(float(loss), float(loss0), rtol=1e-6)
    for (path, g), g0 in zip(jax.tree_util.tree_flatten_with_path(grads)[0], jax.tree_util.tree_leaves(grads0)):
        scale = float(np.abs(np.asarray(g0)).max())
        np.testing.assert_allclose(np.asarray(g), np.asarray(g0), rtol=0, atol=1e-5 * scale,
                                   err_msg=jax.tree_util.keystr(path))


def test_full_remat_compiles_to_less_temporary_memory():
    """A compiled training step keeps fewer temporaries with ``full`` than without remat. The config has only
    full-attention layers and a wide MLP, so the stored block activations are a visible part of XLA:CPU's
    temporaries (with SSE layers the per-loop temporaries of the chunked recurrences dominate on CPU; the
    small-8l, T = 4k numbers are in BENCHMARKS.md, ``tools/remat_memory.py``)."""
    config = SpB2Config.from_json_file(REPO / "configs" / "tiny.json")
    layers = tuple(range(config.num_hidden_layers))
    config = config.replace(attn=dataclasses.replace(config.attn, layers=layers, full_layers=layers),
                            intermediate_size=2048)
    params = abstract_params(config)
    ids = jax.ShapeDtypeStruct((1, 256), jnp.int32)

    def temp(policy):
        options = resolve_options(config, remat=policy)
        step = jax.value_and_grad(lambda p, x: loss_fn(p, config, x, x, options=options)[0])
        return jax.jit(step).lower(params, ids).compile().memory_analysis().temp_size_in_bytes

    none, full = temp("none"), temp("full")
    assert full < 0.95 * none, (full, none)
