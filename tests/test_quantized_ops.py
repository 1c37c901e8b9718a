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
                                    quantize_fp8_weight, quantize_int8_weight, spiking_linear)
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
