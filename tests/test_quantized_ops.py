"""FP8 and INT8-Spiking linear products (``spb2_jax.ops.quantized``) against their definitions.

FP8: the ``dot_general`` on float8 operands equals ``(x_q.astype(f32) @ w_q.astype(f32).T) * s_x * s_w`` exactly on
CPU, with values at and near +-448; quantisation error within e4m3's half-ulp bound. INT8: every group product is
the exact integer product (int64 NumPy), and the float result is the float64 sum of the scaled group products
within float32 rounding.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from spb2_jax.ops.quantized import (FP8_MAX, fp8_linear, fp8_matmul, group_products, quantize_fp8_activation,
                                    quantize_fp8_weight, quantize_int8_weight, spiking_attention_inputs,
                                    spiking_linear)
from spb2_jax.ops.spikes import spike_counts


def _fp8_inputs(seed=0, M=5, D=40, F=7):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(M, D)).astype(np.float32) * rng.uniform(0.01, 30, (M, 1)).astype(np.float32)
    w = rng.normal(size=(D, F)).astype(np.float32) * 0.05
    x[0, :3] = [448.0, -447.9, 440.0]  # a token whose amax is 448: its scale is 1, values sit at the e4m3 edge
    w[:, 0] = 0.0  # an all-zero output channel
    return x, w


def test_fp8_weight_and_activation_scales_hit_448_and_round_within_half_an_ulp():
    x, w = _fp8_inputs()
    w_q, s_w = quantize_fp8_weight(jnp.asarray(w))
    x_q, s_x = quantize_fp8_activation(jnp.asarray(x))
    assert w_q.dtype == jnp.float8_e4m3fn and w_q.shape == (7, 40) and s_w.shape == (7,)
    assert float(s_w[0]) == 1.0 and not np.asarray(w_q[0], np.float32).any()
    np.testing.assert_array_equal(np.abs(np.asarray(x_q, np.float32)).max(-1), FP8_MAX)  # amax maps to 448
    assert float(s_x[0, 0]) == 1.0
    # e4m3 has 3 mantissa bits: relative rounding error <= 2^-4 for normal values
    back = np.asarray(x_q, np.float32) * np.asarray(s_x)
    normal = np.abs(x) / np.asarray(s_x) >= 2.0 ** -6
    assert np.all(np.abs(back - x)[normal] <= 2.0 ** -4 * np.abs(x)[normal] * (1 + 1e-6))


def test_fp8_dot_equals_the_upcast_product_exactly_on_cpu():
    x, w = _fp8_inputs(1)
    w_q, s_w = quantize_fp8_weight(jnp.asarray(w))
    x_q, s_x = quantize_fp8_activation(jnp.asarray(x))
    got = np.asarray(jax.jit(fp8_matmul)(x_q, s_x, w_q, s_w))
    want = np.asarray((x_q.astype(jnp.float32) @ w_q.astype(jnp.float32).T) * s_x * s_w)
    np.testing.assert_array_equal(got, want)
    # the largest products: 448 x 448 x D does not overflow the float32 accumulator
    big = jnp.full((2, 64), 448.0, jnp.float32).astype(jnp.float8_e4m3fn)
    ones = jnp.ones((2, 1), jnp.float32)
    out = np.asarray(fp8_matmul(big, ones, big, jnp.ones((2,), jnp.float32)))
    np.testing.assert_array_equal(out, np.full((2, 2), 448.0 * 448.0 * 64, np.float32))
    ref = x @ w  # and the whole path approximates the float32 product to e4m3 precision
    assert np.abs(np.asarray(fp8_linear(jnp.asarray(x), w_q, s_w)) - ref).max() <= 0.1 * np.abs(ref).max()


def test_int8_group_products_are_exact_and_the_sum_is_float32_rounding():
    rng = np.random.default_rng(2)
    D, F = 300, 9  # 3 groups, the last one partial
    x = rng.standard_t(4, size=(2, 6, D)).astype(np.float32)
    w = (rng.normal(size=(D, F)) * 0.03).astype(np.float32)
    w_q, scale = quantize_int8_weight(jnp.asarray(w))
    assert w_q.dtype == jnp.int8 and w_q.shape == (D, F) and scale.shape == (3, F)
    n, v_th = spike_counts(jnp.asarray(x).reshape(-1, D), 3.0)
    prods = np.asarray(group_products(n, w_q))
    n64, w64 = np.asarray(n, np.int64), np.asarray(w_q, np.int64)
    for g in range(3):
        sl = slice(128 * g, min(128 * (g + 1), D))
        np.testing.assert_array_equal(prods[g], n64[:, sl] @ w64[sl])
    want = (np.einsum("gmf,gf->mf", prods.astype(np.float64), np.asarray(scale, np.float64))
            * np.asarray(v_th, np.float64)).reshape(2, 6, F)
    got = np.asarray(spiking_linear(jnp.asarray(x), w_q, scale, 3.0))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * np.abs(want).max())
    # dequantised weights are within half a step of the originals
    deq = np.asarray(w_q, np.float32) * np.repeat(np.asarray(scale), 128, axis=0)[:D]
    assert np.all(np.abs(deq - w) <= 0.5 * np.repeat(np.asarray(scale), 128, axis=0)[:D] * (1 + 1e-6))


def test_int8_weights_use_the_full_range():
    w = jnp.asarray(np.linspace(-1, 1, 256 * 3, dtype=np.float32).reshape(256, 3))
    w_q, _ = quantize_int8_weight(w)
    assert int(jnp.max(jnp.abs(w_q.astype(jnp.int32)))) == 127
    assert ml_dtypes.finfo(jnp.float8_e4m3fn).max == FP8_MAX


def test_spiking_attention_operands_against_float64():
    """Queries: counts ``round(q / V_th)`` (half to even, clipped at +-127) with ``V_th = mean|q| / k`` over the head
    dimension per token and head; keys / values: symmetric INT8 per token and head (``amax / 127``). The score of the
    coded operands is ``V_th s_k (n_q . k_q)`` (an exact integer dot) up to float32 rounding."""
    rng = np.random.default_rng(7)
    B, T, N, K, H = 2, 5, 4, 2, 64  # one dominant entry counts up to k H = 192: it clips
    q = rng.standard_t(3, size=(B, T, N, H)).astype(np.float32)
    k = rng.normal(size=(B, T, K, H)).astype(np.float32)
    v = rng.normal(size=(B, T, K, H)).astype(np.float32)
    q[0, 0, 0] = 0.0  # an all-zero query row: threshold clamped at 1e-5, counts 0
    q[0, 1, 0, 0] = 1e3  # one huge entry: its count clips at 127
    k[1, 2, 1] = 0.0  # an all-zero key row: scale 1, codes 0
    cq, ck, cv, (n, v_th) = spiking_attention_inputs(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), 3.0)
    th = np.clip(np.abs(q.astype(np.float64)).mean(-1, keepdims=True) / 3.0, 1e-5, 1e4)
    n64 = np.clip(np.round(q / th), -127, 127)
    np.testing.assert_allclose(np.asarray(v_th), th, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(n, np.int64), n64)
    assert n64[0, 1, 0, 0] == 127 and not n64[0, 0, 0].any()
    for x, coded in ((k, ck), (v, cv)):
        amax = np.abs(x.astype(np.float64)).max(-1, keepdims=True)
        s = np.where(amax > 0, amax / 127, 1.0)
        codes = np.round(x / s)
        np.testing.assert_allclose(np.asarray(coded, np.float64), codes * s, rtol=1e-6, atol=0)
        assert np.abs(codes).max() == 127
    s_k = np.abs(k.astype(np.float64)).max(-1) / 127
    kc = np.round(k / np.where(s_k > 0, s_k, 1.0)[..., None])
    exact = np.einsum("btnh,bsnh->bnts", n64, np.repeat(kc, N // K, axis=2))  # integer dots, exact in float64
    want = exact * th[..., 0].transpose(0, 2, 1)[..., None] * np.repeat(s_k, N // K, axis=2).transpose(0, 2, 1)[:, :, None]
    got = np.einsum("btnh,bsnh->bnts", np.asarray(cq, np.float64), np.repeat(np.asarray(ck, np.float64), N // K, 2))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * np.abs(want).max())


def test_fp8_linear_equals_qwix_ptq():
    """google/qwix (an independent FP8 implementation: per-channel absmax weights, per-token dynamic activations)
    quantises a Flax Dense to the same e4m3 codes and scales, and its output equals ``fp8_linear`` up to the order of
    the two scale multiplications (float32 rounding)."""
    import flax.linen as nn
    import qwix

    rng = np.random.default_rng(11)
    x = jnp.asarray(rng.normal(size=(3, 7, 72)) * rng.uniform(0.1, 20, (3, 7, 1)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(72, 40)) * 0.05, jnp.float32)
    dense = nn.Dense(40, use_bias=False)
    rule = qwix.QuantizationRule(module_path=".*", weight_qtype=jnp.float8_e4m3fn, act_qtype=jnp.float8_e4m3fn)
    qdense = qwix.quantize_model(dense, qwix.PtqProvider([rule]))
    qparams = qwix.quantize_params({"kernel": w}, jax.eval_shape(qdense.init, jax.random.key(0), x)["params"])
    theirs = qdense.apply({"params": qparams}, x)
    w_q, s_w = quantize_fp8_weight(w)
    ours = fp8_linear(x, w_q, s_w)
    their_w = qparams["kernel"].array
    np.testing.assert_array_equal(np.asarray(their_w.qvalue, np.float32).T, np.asarray(w_q, np.float32))
    np.testing.assert_array_equal(np.asarray(their_w.scale).reshape(-1), np.asarray(s_w))
    np.testing.assert_allclose(np.asarray(theirs), np.asarray(ours), rtol=0, atol=4e-7 * float(jnp.max(jnp.abs(ours))))
