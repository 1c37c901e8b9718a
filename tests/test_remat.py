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
from tests.helpers import X64_RTOL


def _step(config, ids, labels, policy, dtype):
    """Jitted ``(params, dropout_key) -> (loss, grads)`` under one remat policy."""
    options = resolve_options(config, remat=policy, dtype=dtype, param_dtype=dtype)
    fn = lambda p, key: loss_fn(p, config, ids, labels, options=options, dropout_rng=key)[0]  # noqa: E731
    return jax.jit(jax.value_and_grad(fn))


def _zero_leaves(grads):
    return {jax.tree_util.keystr(p) for p, g in jax.tree_util.tree_flatten_with_path(grads)[0] if not np.any(g)}


@pytest.fixture(scope="module")
def tiny_case():
    """The tiny fixture in float64 with ``swa_dropout = 0.5`` (SWA dropout drops a layer's whole SWA branch), a
    dropout key whose draw keeps one SSE-SWA layer's branch and drops the other's, and the loss and gradients
    without remat for that key."""
    config, params = load_hf(fixture_dir("tiny"), progress=False)
    inputs = np.load(fixture_dir("tiny") / "inputs.npz")
    config = config.replace(swa_dropout=0.5)
    with jax.enable_x64(True):
        params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), params)
        ids, labels = jnp.asarray(inputs["input_ids"]), jnp.asarray(inputs["labels"])
        plain = _step(config, ids, labels, "none", "float64")
        for seed in range(32):
            key = jax.random.key(seed)
            loss0, grads0 = plain(params, key)
            dropped = {layer for layer in ("layers_1", "layers_4")
                       if f"['model']['{layer}']['attn']['swa_q_proj']['kernel']" in _zero_leaves(grads0)}
            if len(dropped) == 1:
                return config, params, ids, labels, key, (loss0, grads0)
    pytest.fail("no key in range(32) drops exactly one SWA branch")


@pytest.mark.parametrize("policy", [p for p in REMAT_POLICIES if p != "none"])
def test_each_policy_gives_the_same_loss_and_gradients(tiny_case, policy):
    """Recomputation runs the same operations, but XLA fuses (and so sums) them differently, so the two runs agree
    only to reassociation error. In float32 that error is not small everywhere: the SSE router gradient
    (``sse_e_proj``) is ill-conditioned (the router probability reaches the output only through the L2 norm's eps;
    tests/helpers.py derives an amplification of up to 1e7), so two correct float32 evaluations differ by ~1e-4 of
    the leaf there. Both runs are therefore made in float64 (unit roundoff 1.1e-16; times the 1e7 amplification and a
    reduction depth ~1e2 -> ~1e-7), held to X64_RTOL = 1e-6 of each leaf's largest gradient. A wrong recompute (a
    different dropout draw, a dropped cotangent) differs by O(1); the dropped SWA branch's gradients must stay
    exactly zero."""
    config, params, ids, labels, key, (loss0, grads0) = tiny_case
    with jax.enable_x64(True):
        loss, grads = _step(config, ids, labels, policy, "float64")(params, key)
    assert jax.tree.leaves(grads)[0].dtype == jnp.float64
    np.testing.assert_allclose(float(loss), float(loss0), rtol=1e-12)
    assert _zero_leaves(grads) == _zero_leaves(grads0)
    for (path, g), g0 in zip(jax.tree_util.tree_flatten_with_path(grads)[0], jax.tree_util.tree_leaves(grads0)):
        scale = float(np.abs(np.asarray(g0)).max())
        np.testing.assert_allclose(np.asarray(g), np.asarray(g0), rtol=0, atol=X64_RTOL * scale,
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
