"""The coded model (``ModelOptions.coding``) on ``spb2_jax.quant.quantize`` params: which layers are quantised,
the float8 dot of every FP8 layer in the program XLA receives, and the errors for bad input."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

import spb2_jax as spb2
from spb2_jax.quant import quantize, quantized_layers
from spb2_jax.layers.common import QUANT_EXEMPT


@pytest.fixture(scope="module")
def tiny():
    return spb2.load_pretrained(None)  # the embedded tiny model: MoBA, full and SSE-GDN layers


@pytest.mark.parametrize("coding, kdtype", [("fp8", jnp.float8_e4m3fn), ("int8_spiking", jnp.int8)])
def test_quantize_codes_every_linear_layer_but_the_exempt_ones(tiny, coding, kdtype):
    q = traverse_util.flatten_dict(quantize(tiny.params, tiny.config, coding))
    flat = traverse_util.flatten_dict(tiny.params)
    coded = set(quantized_layers(tiny.params))
    assert len(coded) == 66 and not any(p[-1] in QUANT_EXEMPT for p in coded)
    for path, value in flat.items():
        if path[:-1] in coded and path[-1] == "kernel":
            D, F = value.shape
            assert q[path].dtype == kdtype
            assert q[path].shape == ((F, D) if coding == "fp8" else (D, F))
            assert q[path[:-1] + ("scale",)].shape == ((F,) if coding == "fp8" else (-(-D // 128), F))
        else:  # embeddings, norms, A_log / dt_bias, the gates and router: untouched
            assert q[path] is value, path
    exempt = [p for p in flat if p[-2] in QUANT_EXEMPT]
    assert exempt and all(q[p].dtype == jnp.float32 for p in exempt)


def test_every_fp8_layer_is_one_float8_dot_in_the_program(tiny):
    """The lowered program (what XLA receives) holds one ``dot_general`` with two float8_e4m3fn operands and a
    float32 result per quantised layer. (XLA:CPU then upcasts them; on Hopper XLA:GPU rewrites this pattern into a
    cuBLASLt FP8 GEMM, which needs a GPU run to show.)"""
    qp = quantize(tiny.params, tiny.config, "fp8")
    model = spb2.SpB2ForCausalLM(tiny.config, spb2.resolve_options(tiny.config, coding="fp8"))
    text = jax.jit(lambda p, ids: model.apply({"params": p}, ids).logits).lower(
        qp, jnp.ones((1, 32), jnp.int32)).as_text()
    f8_dots = re.findall(r"stablehlo\.dot_general[^\n]*\(tensor<[^>]*f8E4M3FN>, tensor<[^>]*f8E4M3FN>\) -> "
                         r"tensor<[^>]*f32>", text)
    assert len(f8_dots) == len(quantized_layers(tiny.params)) == 66


@pytest.mark.parametrize("coding", ["fp8", "int8_spiking"])
def test_the_coded_model_runs_close_to_float32(tiny, coding):
    """A smoke bound only (the embedded model has random O(1) weights, the worst case for coding): finite logits
    whose argmax agrees with float32 on most tokens. The accuracy measurement on a trained model is a benchmark."""
    ids = jnp.asarray(np.random.default_rng(0).integers(3, 384, (2, 48)))
    ref = np.asarray(tiny(ids).logits)
    qp = quantize(tiny.params, tiny.config, coding)
    model = spb2.SpB2ForCausalLM(tiny.config, spb2.resolve_options(tiny.config, coding=coding))
    out = np.asarray(jax.jit(lambda p, i: model.apply({"params": p}, i).logits)(qp, ids))
    assert np.isfinite(out).all() and out.shape == ref.shape
    assert (out.argmax(-1) == ref.argmax(-1)).mean() > 0.3  # chance: 1/384


def test_bad_codings_and_params_raise_clear_errors(tiny):
    with pytest.raises(ValueError, match="coding='int4' is not one of"):
        spb2.resolve_options(tiny.config, coding="int4")
    with pytest.raises(ValueError, match="spike_k=0.0 must be > 0"):
        spb2.resolve_options(tiny.config, coding="int8_spiking", spike_k=0.0)
    with pytest.raises(ValueError, match="coding='int4' is not one of"):
        quantize(tiny.params, tiny.config, "int4")
    with pytest.raises(ValueError, match="tied to the embeddings"):
        quantize(tiny.params, tiny.config, "fp8", lm_head=True)
    with pytest.raises(ValueError, match="already quantised"):
        quantize(quantize(tiny.params, tiny.config, "fp8"), tiny.config, "int8_spiking")
    with pytest.raises(ValueError, match="no linear layer kernels"):
        quantize({"model": {"norm": {"scale": jnp.ones(4)}}}, tiny.config, "fp8")


def test_spiking_statistics_are_sown_without_changing_the_output(tiny):
    ids = jnp.asarray(np.random.default_rng(1).integers(3, 384, (2, 40)))
    qp = quantize(tiny.params, tiny.config, "int8_spiking")
    model = spb2.SpB2ForCausalLM(tiny.config, spb2.resolve_options(tiny.config, coding="int8_spiking"))
    plain = jax.jit(lambda p, i: model.apply({"params": p}, i).logits)(qp, ids)
    out, state = jax.jit(lambda p, i: model.apply({"params": p}, i, mutable=["intermediates"]))(qp, ids)
    np.testing.assert_array_equal(np.asarray(out.logits), np.asarray(plain))
    stats = {path[:-1]: v[0] for path, v in traverse_util.flatten_dict(state["intermediates"]).items()
             if path[-1] == "spike_stats"}
    assert len(stats) == 66  # every coded layer reported its input
    for layer, values in stats.items():
        s = {k: float(v) for k, v in values.items()}
        assert 0 <= s["zero_fraction"] <= 1 and 0 <= s["silent_channel_fraction"] <= s["zero_fraction"] + 1e-6
        assert s["small_count_share"] >= s["zero_fraction"] and s["mean_popcount"] <= s["mean_abs_count"] + 1e-6
        assert 1 <= s["max_abs_count"] <= 127 and s["clip_rate"] >= 0
    queries = {path[:-1]: v[0] for path, v in traverse_util.flatten_dict(state["intermediates"]).items()
               if path[-1] == "query_spike_stats"}
    c = tiny.config
    assert len(queries) == c.num_hidden_layers  # every softmax attention (full, MoBA, the SWA half of SSE layers)
    for values in queries.values():
        assert float(values["numel"]) == 2 * 40 * c.attn.num_heads * c.head_dim


def test_count_stats_against_numpy():
    from spb2_jax.ops.spikes import count_stats
    from spb2_jax.quant import spike_counts

    rng = np.random.default_rng(3)
    x = rng.standard_t(3, size=(4, 7, 32)).astype(np.float32)
    x[..., 5] = 0.0  # a silent channel
    n, v = spike_counts(jnp.asarray(x), 3.0)
    s = {k: float(val) for k, val in count_stats(n, jnp.asarray(x), v).items()}
    a = np.abs(np.asarray(n, np.int64))
    assert s["zero_fraction"] == pytest.approx((a == 0).mean())
    assert s["mean_abs_count"] == pytest.approx(a.mean())
    assert s["mean_popcount"] == pytest.approx(np.vectorize(lambda t: bin(t).count("1"))(a).mean())
    assert s["small_count_share"] == pytest.approx((a <= 7).mean())
    assert s["silent_channel_fraction"] == pytest.approx((a.reshape(-1, 32) == 0).all(0).mean())
    assert s["max_abs_count"] == a.max() and s["numel"] == a.size
