"""INT8-Spiking counts and the spike-train emulator (``spb2_jax.quant``): property tests (hypothesis) that every
encoder decodes back to its counts and that the event-driven accumulator equals the int32 matmul bit for bit, on
random int8 tensors including all-zero rows, +-127 and -128; the counts against a float64 NumPy oracle."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from spb2_jax.quant import SCHEMES, clip_rate, decode_spikes, encode_spikes, spike_counts, spike_matmul

SIGNED = [s for s in SCHEMES if s != "binary"]


def _int8(shape, low=-128, high=127):
    """int8 arrays biased toward the edges: all-zero rows, +-127 and -128 appear often."""
    values = st.one_of(st.integers(low, high), st.sampled_from([v for v in (0, 127, -127, -128, 1, -1)
                                                               if low <= v <= high]))
    return arrays(np.int8, shape, elements=values).map(lambda a: _zero_a_row(a))


def _zero_a_row(a):
    if a.ndim == 2 and a.shape[0] > 1:
        a = a.copy()
        a[0] = 0
    return a


@settings(max_examples=40, deadline=None)
@given(n=st.tuples(st.integers(1, 4), st.integers(1, 9)).flatmap(_int8), scheme=st.sampled_from(SIGNED))
def test_signed_encoders_round_trip(n, scheme):
    s = encode_spikes(jnp.asarray(n), scheme)
    assert s.dtype == jnp.int8 and s.shape[1:] == n.shape
    allowed = {0, 1} if scheme == "twos_complement" else {-1, 0, 1}
    assert set(np.unique(np.asarray(s)).tolist()) <= allowed
    np.testing.assert_array_equal(np.asarray(decode_spikes(s, scheme)), n.astype(np.int32))


@settings(max_examples=30, deadline=None)
@given(n=st.tuples(st.integers(1, 4), st.integers(1, 9)).flatmap(lambda sh: _int8(sh, 0, 127)))
def test_binary_encoder_round_trips_nonnegative_counts(n):
    s = encode_spikes(jnp.asarray(n), "binary")
    assert s.shape[0] == max(int(n.max()), 1) and set(np.unique(np.asarray(s)).tolist()) <= {0, 1}
    np.testing.assert_array_equal(np.asarray(decode_spikes(s, "binary")), n.astype(np.int32))


@settings(max_examples=40, deadline=None)
@given(data=st.data(), scheme=st.sampled_from(SCHEMES))
def test_event_driven_accumulator_equals_the_int32_matmul(data, scheme):
    rows, d, f = data.draw(st.integers(1, 4)), data.draw(st.integers(1, 16)), data.draw(st.integers(1, 6))
    n = data.draw(_int8((rows, d), 0 if scheme == "binary" else -128, 127))
    w = data.draw(_int8((d, f)))
    got = spike_matmul(encode_spikes(jnp.asarray(n), scheme), jnp.asarray(w), scheme)
    want = n.astype(np.int64) @ w.astype(np.int64)  # exact
    assert got.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(got), want)


def test_bitwise_steps_and_extremes():
    n = jnp.asarray([[0, 1, -1, 127, -127, -128]], jnp.int8)
    assert encode_spikes(n, "bitwise").shape[0] == 8  # ceil(log2(128 + 1))
    assert encode_spikes(n, "twos_complement").shape[0] == 8
    assert encode_spikes(n, "ternary").shape[0] == 128
    assert encode_spikes(jnp.zeros((2, 3), jnp.int8), "bitwise").shape[0] == 1
    np.testing.assert_array_equal(np.asarray(encode_spikes(jnp.asarray([5, -6]), "bitwise")),
                                  [[1, -1], [0, -1], [1, 0]])  # 5 = 101, -6 = -(110), MSB first


def test_spike_counts_follow_the_threshold_rule():
    rng = np.random.default_rng(0)
    x = rng.standard_t(3, size=(3, 5, 64)).astype(np.float32)
    x[0, 0] = 0.0  # a silent token: threshold clamps at 1e-5
    x[1, 1, 3] = 1e3  # one outlier beyond 127 thresholds
    n, v_th = spike_counts(jnp.asarray(x), k=3.0)
    want_v = np.clip(np.abs(x.astype(np.float64)).mean(-1, keepdims=True) / 3.0, 1e-5, 1e4)
    np.testing.assert_allclose(np.asarray(v_th), want_v, rtol=1e-6)
    want_n = np.clip(np.round(x / np.asarray(v_th)), -127, 127)
    np.testing.assert_array_equal(np.asarray(n), want_n.astype(np.int8))
    assert n.dtype == jnp.int8 and int(n[1, 1, 3]) == 127  # clipped, not wrapped
    assert float(clip_rate(jnp.asarray(x), v_th)) == pytest.approx(1 / x.size)
    assert not np.asarray(n[0, 0]).any()


@pytest.mark.parametrize("call, match", [
    (lambda: encode_spikes(jnp.asarray([1, 2]), "morse"), "unknown spike scheme 'morse'"),
    (lambda: spike_counts(jnp.ones((2, 4)), k=0.0), "k=0.0 must be > 0"),
    (lambda: encode_spikes(jnp.asarray([-1, 2]), "binary"), "counts must be >= 0"),
    (lambda: encode_spikes(jnp.asarray([9]), "bitwise", T=3), "T=3 cannot hold"),
])
def test_bad_inputs_raise_clear_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()
