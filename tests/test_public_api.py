"""Public names are a contract: they exist at the promised paths, as functions with the promised behaviour."""

from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import spb2_jax as spb2
from spb2_jax.ops import (attention_reference, chunk_gated_delta_rule, chunk_gla, gated_delta_rule_reference,
                          gla_reference, moba_attention, moba_attention_reference, sliding_window_attention)


def test_package_exports():
    for name in ("load_pretrained", "Model", "resolve_options", "ModelOptions", "Kernels", "SpB2Config",
                 "SpB2ForCausalLM", "CausalLMOutput", "Segments", "load_hf", "save_hf", "generate", "prefill",
                 "decode_step", "init_cache", "loss_fn", "causal_lm_loss", "causal_lm_loss_tiled", "logical_axes",
                 "load_qwen3", "save_qwen3"):
        assert name in spb2.__all__ and hasattr(spb2, name), name
    assert list(inspect.signature(spb2.load_qwen3).parameters)[0] == "path"
    from spb2_jax.t2h import convert, new_param_mask  # T2H: the converter's functions
    assert callable(convert) and callable(new_param_mask)
    assert list(inspect.signature(spb2.Model.__call__).parameters) == [
        "self", "input_ids", "attention_mask", "segment_ids", "output_hidden_states"]


def _inputs(B=2, T=37, N=4, K=2, H=16, seed=0):
    keys = jax.random.split(jax.random.key(seed), 6)
    q = jax.random.normal(keys[0], (B, T, N, H))
    k = jax.random.normal(keys[1], (B, T, K, H))
    v = jax.random.normal(keys[2], (B, T, K, H))
    seg = jnp.asarray(np.r_[[1] * 20 + [2] * 17, [0] * 5 + [1] * 32].reshape(2, T))
    return q, k, v, seg, keys


@pytest.mark.parametrize("fn", [chunk_gated_delta_rule, chunk_gla, moba_attention, sliding_window_attention])
def test_long_context_ops_are_functions_at_spb2_jax_ops(fn):
    """``spb2_jax.ops.chunk_gated_delta_rule`` etc. are the functions (not submodules shadowing them)."""
    assert inspect.isfunction(fn) and fn.__module__.startswith("spb2_jax.ops.")


def test_long_context_ops_equal_their_references():
    """One packed, GQA, T-not-a-multiple case per op against its reference (the suites in test_ops_* cover the
    awkward shapes); float32, 1e-5."""
    q, k, v, seg, keys = _inputs()
    np.testing.assert_allclose(
        moba_attention(q, k, v, chunk_size=8, topk=3, segment_ids=seg),
        moba_attention_reference(q, k, v, chunk_size=8, topk=3, segment_ids=seg), atol=1e-5)
    np.testing.assert_allclose(
        sliding_window_attention(q, k, v, window=7, segment_ids=seg),
        attention_reference(q, k, v, window=7, segment_ids=seg), atol=1e-5)
    B, T, H, D = q.shape
    g = -jax.nn.softplus(jax.random.normal(keys[3], (B, T, H)))
    beta = jax.nn.sigmoid(jax.random.normal(keys[4], (B, T, H)))
    vv = jax.random.normal(keys[5], (B, T, H, D))
    for fast, ref in ((chunk_gated_delta_rule(q, q * 0.5, vv, g, beta, segment_ids=seg, chunk_size=8),
                       gated_delta_rule_reference(q, q * 0.5, vv, g, beta, segment_ids=seg)),
                      (chunk_gla(q, q * 0.5, vv, jnp.broadcast_to(g[..., None], q.shape) / 4, segment_ids=seg,
                                 chunk_size=8),
                       gla_reference(q, q * 0.5, vv, jnp.broadcast_to(g[..., None], q.shape) / 4, segment_ids=seg))):
        for a, b in zip(fast, ref):
            np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


def test_ops_accept_segments_built_once():
    """A ``Segments`` passed in gives what its ids give (the model builds it once per forward)."""
    q, k, v, seg, _ = _inputs()
    a = moba_attention(q, k, v, chunk_size=8, topk=3, segment_ids=spb2.Segments.from_ids(seg))
    np.testing.assert_array_equal(a, moba_attention(q, k, v, chunk_size=8, topk=3, segment_ids=seg))
    with pytest.raises(ValueError, match="segment_ids shape"):
        moba_attention(q, k, v, chunk_size=8, topk=3, segment_ids=seg[:, :5])
