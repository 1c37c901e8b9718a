"""spb2_jax.ops reference implementations against the float64 NumPy oracles in tests/oracles.py.

Error metric: ``max|actual - expected| / max|expected|`` (a relative error scaled by the largest entry, so
exact-zero padding outputs do not divide by zero). Inputs are float32 values; the oracle sees the same values
in float64, so the error is the float32 arithmetic of the op alone (unit roundoff u = 2^-24 ~ 6e-8). Bounds
from that arithmetic (every case measured here stays below 7e-7, so the bounds below have >= 10x headroom):
- norms: a handful of roundings per entry plus a <= 64-term sum -> TOL_ELEMENTWISE = 1e-6.
- attention / MoBA: D <= 64 dot products give logit errors ~ sqrt(D) u |q||k| scale ~ 3e-7 absolute, which
  the softmax passes on as a relative output error of the same size -> TOL_ATTN = 5e-6.
- RoPE: angles pos * inv_freq are float32 (as in HF), absolute angle error <= pos u ~ 7e-6 for the positions
  used (< 128) -> TOL_ROPE = 1e-5 (it grows with position: that is float32 RoPE, not a bug).
- recurrences (T <= 100 steps, contractive decays and delta steps): rounding errors of the K-term state
  updates add up like a random walk, ~ sqrt(T K) u ~ 5e-6 -> TOL_REC = 1e-5.
Under ``jax.enable_x64(True)`` the ops run on float64 inputs in float64 and must match to TOL_X64 = 1e-12
(observed ~1e-15); this pins details far below float32 noise (eps placement, scales, masks).
"""

from __future__ import annotations

import functools
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spb2_jax import ops
from tests import oracles

TOL_ELEMENTWISE = 1e-6
TOL_ATTN = 5e-6
TOL_ROPE = 1e-5
TOL_REC = 1e-5
TOL_X64 = 1e-12


# ----------------------------------------------------------------------------------------------- helpers
@pytest.fixture(autouse=True, scope="module")
def _fast_compiles():
    """XLA compile time dominates this file (~70 small programs); skipping most XLA optimisation passes halves
    the wall time and changes nothing the oracle comparisons look at. Restored afterwards (module scope)."""
    old = jax.config.values["jax_disable_most_optimizations"]
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", old)


def rel_err(actual, expected) -> float:
    a, e = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert a.shape == e.shape, (a.shape, e.shape)
    return float(np.max(np.abs(a - e), initial=0.0) / max(np.max(np.abs(e), initial=0.0), 1e-30))


def assert_close(actual, expected, tol, what=""):
    err = rel_err(actual, expected)
    assert err <= tol, f"{what}: max|err| / max|ref| = {err:.3e} > {tol:.1e}"


def rng_for(*key) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


def randn(rng, *shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def make_segment_ids(B: int, T: int, layout: str) -> np.ndarray:
    """``[B, T]`` int32 segment ids (0 = padding).

    single: one segment per row. leftpad / rightpad: padding then one segment / one segment then padding
    (row 1 of leftpad is fully real). varlen: even rows = left padding + 3 segments incl. a length-1 one;
    odd rows = a length-1 segment first, 2 more segments, right padding (ids 5, 7, 9 are not consecutive).
    """
    seg = np.zeros((B, T), np.int32)
    for b in range(B):
        if layout == "single":
            seg[b] = 1
        elif layout == "leftpad":
            pad = 0 if b % 2 else max(1, T // 5)
            seg[b, pad:] = 1
        elif layout == "rightpad":
            pad = max(1, T // 6) if T > 1 else 0
            seg[b, :T - pad] = 1
        elif layout == "varlen":
            if T < 6:
                seg[b] = [1] * (T - 1) + [2] if b % 2 == 0 else [0] + [3] * (T - 1)
                continue
            if b % 2 == 0:
                pad = max(1, T // 10)
                a = (T - pad) * 2 // 5
                lens, ids, start = [a, 1, T - pad - a - 1], [1, 2, 3], pad
            else:
                pad = max(1, T // 8)
                rest = T - pad
                lens, ids, start = [1, rest // 2, rest - 1 - rest // 2], [5, 7, 9], 0
            for n, i in zip(lens, ids):
                seg[b, start:start + n] = i
                start += n
        elif layout == "holes":  # ids reused: a padding hole or another id in between starts a new segment
            third = max(1, T // 3)
            if b % 2 == 0:
                seg[b] = 1
                seg[b, third:third + 2] = 0
            else:
                seg[b] = 2
                seg[b, third:2 * third] = 3
        else:
            raise ValueError(layout)
    return seg


def jcall(fn, *args, static=None, **kwargs):
    """``fn(*args, **kwargs)`` under one ``jax.jit`` (``static`` kwargs bound first): one compile per call
    instead of one per eager primitive, which is what keeps this file fast on CPU."""
    return jax.jit(functools.partial(fn, **(static or {})))(*args, **kwargs)


def to_jnp(*xs):
    return tuple(None if x is None else jnp.asarray(x) for x in xs)


silu, softmax_np = oracles.silu, oracles.softmax


def log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


def x64():
    """Float64 mode for one block only (does not leak into other tests)."""
    return jax.enable_x64(True)


# ----------------------------------------------------------------------------------------------- the oracles
def test_oracles_closed_forms():
    """The oracles themselves on cases with a closed form (one token from a zero state)."""
    rng = rng_for("closed")
    q, k, v = rng.standard_normal((1, 1, 1, 8)), rng.standard_normal((1, 1, 1, 8)), rng.standard_normal((1, 1, 1, 4))
    scale = 8 ** -0.5
    o, S = oracles.gla(q, k, v, np.full((1, 1, 1, 8), -0.7))
    np.testing.assert_allclose(o[0, 0, 0], v[0, 0, 0] * (q[0, 0, 0] @ k[0, 0, 0]) * scale, rtol=1e-13)
    np.testing.assert_allclose(S[0, 0], np.outer(k[0, 0, 0], v[0, 0, 0]), rtol=1e-13)
    o, S = oracles.gated_delta_rule(q, k, v, np.full((1, 1, 1), -0.7), np.full((1, 1, 1), 1.5))
    qn, kn = q[0, 0, 0] / np.sqrt(q[0, 0, 0] @ q[0, 0, 0] + 1e-6), k[0, 0, 0] / np.sqrt(k[0, 0, 0] @ k[0, 0, 0] + 1e-6)
    np.testing.assert_allclose(o[0, 0, 0], 1.5 * v[0, 0, 0] * (qn @ kn) * scale, rtol=1e-13)
    # delta rule on a stored key: a beta = 1 write of v' with the same unit key replaces the value exactly
    kk = np.zeros((1, 2, 1, 4))
    kk[0, :, 0, 0] = 1.0
    vv = rng.standard_normal((1, 2, 1, 3))
    _, S = oracles.gated_delta_rule(kk, kk, vv, np.zeros((1, 2, 1)), np.ones((1, 2, 1)), use_qk_l2norm=False)
    np.testing.assert_allclose(S[0, 0, 0], vv[0, 1, 0], rtol=1e-13)
    # attention: one visible key -> its value; MoBA with topk >= blocks -> dense causal
    qa, ka, va = rng.standard_normal((1, 9, 2, 4)), rng.standard_normal((1, 9, 1, 4)), rng.standard_normal((1, 9, 1, 4))
    np.testing.assert_allclose(oracles.attention(qa, ka, va, window=1)[0, :, 1], va[0, :, 0], rtol=1e-13)
    np.testing.assert_allclose(oracles.moba_attention(qa, ka, va, 2, 5), oracles.attention(qa, ka, va), rtol=1e-13)


# ----------------------------------------------------------------------------------------------- norms, rope
@pytest.mark.parametrize("shape", [(1, 1, 32), (2, 7, 3, 64)], ids=lambda s: "x".join(map(str, s)))
def test_norms(shape):
    rng = rng_for("norms", shape)
    x, gate = randn(rng, *shape, scale=3.0), randn(rng, *shape)
    w = (1 + 0.3 * rng.standard_normal(shape[-1])).astype(np.float32)
    eps = 1e-5
    x_, gate_, w_ = to_jnp(x, gate, w)
    assert_close(jcall(ops.rms_norm, x_, w_, eps), oracles.rms_norm(x, w, eps), TOL_ELEMENTWISE)
    assert_close(jcall(ops.rms_norm, x_, None, eps), oracles.rms_norm(x, None, eps), TOL_ELEMENTWISE)
    assert_close(jcall(ops.gated_rms_norm, x_, gate_, w_, eps), oracles.gated_rms_norm(x, gate, w, eps),
                 TOL_ELEMENTWISE)
    assert_close(jcall(ops.l2_norm, x_), oracles.l2norm(x), TOL_ELEMENTWISE)


def test_l2_norm_eps_inside_sqrt_and_zero_vector():
    # |x| = 1e-3: eps inside the sqrt gives x / sqrt(1e-6 + 1e-6) = x / 1.414e-3; eps outside would give
    # x / (1e-3 + 1e-6). The two differ by 40 %, so this pins the placement.
    x = np.zeros((2, 16), np.float32)
    x[0, 3] = 1e-3
    y = np.asarray(ops.l2_norm(jnp.asarray(x)))
    assert_close(y, oracles.l2norm(x), TOL_ELEMENTWISE)
    np.testing.assert_allclose(y[0, 3], 1e-3 / np.sqrt(2e-6), rtol=1e-6)
    assert np.all(y[1] == 0)  # the mask form feeds all-zero q / k rows: must stay exactly zero, no NaN
    grad = jax.grad(lambda z: ops.l2_norm(z).sum())(jnp.asarray(x))
    assert np.all(np.isfinite(np.asarray(grad)))


@pytest.mark.parametrize("B,T,N,D,layout", [(1, 1, 1, 32, "single"), (2, 75, 4, 64, "varlen"),
                                            (2, 40, 2, 32, "leftpad"), (2, 45, 2, 32, "holes")],
                         ids=["B1-T1-H1-D32-single", "B2-T75-H4-D64-varlen", "B2-T40-H2-D32-leftpad",
                              "B2-T45-H2-D32-holes"])
def test_segment_positions_and_rope(B, T, N, D, layout):
    seg = make_segment_ids(B, T, layout)
    pos = np.asarray(jcall(ops.segment_positions, jnp.asarray(seg)))
    real = seg != 0
    np.testing.assert_array_equal(pos[real], oracles.segment_positions(seg)[real])
    rng = rng_for("rope", B, T, N, D)
    x = randn(rng, B, T, N, D)
    assert_close(jcall(ops.apply_rope, jnp.asarray(x), jnp.asarray(pos), static=dict(theta=1e4)),
                 oracles.rope(x, pos, 1e4), TOL_ROPE)
    # explicit, larger positions (incl. decode-like offsets) and another theta
    pos2 = rng.integers(0, 120, (B, T)).astype(np.int32)
    assert_close(jcall(ops.apply_rope, jnp.asarray(x), jnp.asarray(pos2), static=dict(theta=5e5)),
                 oracles.rope(x, pos2, 5e5), TOL_ROPE)


# ----------------------------------------------------------------------------------------------- attention
ATTN_CASES = [
    # B, T, N, KV, D, window, layout, causal
    (1, 1, 1, 1, 32, None, "single", True),
    (2, 1, 2, 1, 32, 4, "varlen", True),
    (2, 75, 4, 1, 32, None, "varlen", True),
    (2, 75, 4, 2, 64, 16, "varlen", True),
    (2, 64, 8, 2, 64, 7, "leftpad", True),
    (1, 33, 2, 2, 32, 1, "single", True),
    (2, 50, 4, 4, 32, None, "varlen", False),
    (2, 40, 4, 2, 32, 200, "rightpad", True),
    (2, 45, 4, 2, 32, 9, "holes", True),
]


def _attn_id(c):
    B, T, N, KV, D, window, layout, causal = c
    return f"B{B}-T{T}-H{N}-KV{KV}-D{D}-w{window}-{layout}" + ("" if causal else "-noncausal")


@pytest.mark.parametrize("case", ATTN_CASES, ids=_attn_id)
def test_attention(case):
    B, T, N, KV, D, window, layout, causal = case
    rng = rng_for("attn", case)
    q, k, v = randn(rng, B, T, N, D), randn(rng, B, T, KV, D), randn(rng, B, T, KV, D)
    seg = make_segment_ids(B, T, layout)
    out = jcall(ops.attention_reference, *to_jnp(q, k, v), segment_ids=jnp.asarray(seg),
                static=dict(causal=causal, window=window))
    ref = oracles.attention(q, k, v, seg, causal=causal, window=window)
    assert_close(out, ref, TOL_ATTN)
    assert np.all(np.asarray(out)[seg == 0] == 0), "padding queries must output exact zeros"


def test_attention_custom_scale_and_no_segments():
    rng = rng_for("attn-scale")
    q, k, v = randn(rng, 2, 20, 4, 32), randn(rng, 2, 20, 2, 32), randn(rng, 2, 20, 2, 32)
    out = jcall(ops.attention_reference, *to_jnp(q, k, v), static=dict(scale=0.3, window=5))
    assert_close(out, oracles.attention(q, k, v, None, causal=True, window=5, scale=0.3), TOL_ATTN)


# ----------------------------------------------------------------------------------------------- MoBA
MOBA_CASES = [
    # B, T, N, KV, D, chunk, topk, layout
    (1, 1, 2, 1, 32, 16, 2, "single"),
    (2, 75, 4, 1, 32, 16, 3, "varlen"),
    (2, 75, 4, 2, 64, 16, 2, "varlen"),
    (1, 100, 4, 4, 32, 8, 4, "single"),
    (2, 90, 4, 2, 64, 16, 1, "leftpad"),  # topk 1 with KV > 1 crashed before the moba_selection fix
    (2, 50, 4, 2, 32, 7, 3, "rightpad"),
    (2, 45, 4, 2, 32, 6, 3, "holes"),
]


def _moba_id(c):
    B, T, N, KV, D, C, topk, layout = c
    return f"B{B}-T{T}-H{N}-KV{KV}-D{D}-C{C}-top{topk}-{layout}"


@pytest.mark.parametrize("case", MOBA_CASES, ids=_moba_id)
def test_moba(case):
    B, T, N, KV, D, C, topk, layout = case
    rng = rng_for("moba", case)
    q, k, v = randn(rng, B, T, N, D), randn(rng, B, T, KV, D), randn(rng, B, T, KV, D)
    seg = make_segment_ids(B, T, layout)
    # block selection: exact equality (gate gaps are >> float32 error for these seeds)
    sel = np.asarray(jcall(ops.moba_selection, *to_jnp(q, k), segment_ids=jnp.asarray(seg),
                           static=dict(chunk_size=C, topk=topk)))
    assert sel.shape == (B, N, T, -(-T // C))
    want = oracles.moba_selected_blocks(q, k, C, topk, seg)
    for b in range(B):
        for n in range(N):
            for t in range(T):
                if seg[b, t]:
                    assert set(np.flatnonzero(sel[b, n, t]).tolist()) == want[b][n][t], (b, n, t)
    out = jcall(ops.moba_attention_reference, *to_jnp(q, k, v), segment_ids=jnp.asarray(seg),
                static=dict(chunk_size=C, topk=topk))
    assert_close(out, oracles.moba_attention(q, k, v, C, topk, seg), TOL_ATTN)
    assert np.all(np.asarray(out)[seg == 0] == 0)


@pytest.mark.parametrize("topk", [5, 9], ids=lambda k: f"top{k}")
@pytest.mark.parametrize("layout", ["single", "varlen"])
def test_moba_topk_ge_blocks_is_dense_causal(topk, layout):
    B, T, N, KV, D, C = 2, 75, 4, 2, 32, 16  # 5 blocks
    rng = rng_for("moba-dense", topk, layout)
    q, k, v = randn(rng, B, T, N, D), randn(rng, B, T, KV, D), randn(rng, B, T, KV, D)
    seg = jnp.asarray(make_segment_ids(B, T, layout))
    out = jcall(ops.moba_attention_reference, *to_jnp(q, k, v), segment_ids=seg, static=dict(chunk_size=C, topk=topk))
    dense = jcall(ops.attention_reference, *to_jnp(q, k, v), segment_ids=seg)
    # same masks, same arithmetic: only float32 reassociation can differ
    assert_close(out, dense, 1e-6)
    assert_close(out, oracles.attention(q, k, v, np.asarray(seg)), TOL_ATTN)


# ----------------------------------------------------------------------------------------------- recurrences
def gdn_inputs(rng, B, T, H, K, V, g_scale, init):
    q, k, v = randn(rng, B, T, H, K), randn(rng, B, T, H, K), randn(rng, B, T, H, V)
    g = (-g_scale * np.log1p(np.exp(rng.standard_normal((B, T, H))))).astype(np.float32)  # -softplus, <= 0
    beta = (2 / (1 + np.exp(-2 * rng.standard_normal((B, T, H))))).astype(np.float32)  # (0, 2): neg. eigvals
    s0 = randn(rng, B, H, K, V, scale=0.5) if init else None
    return q, k, v, g, beta, s0


GDN_CASES = [
    # B, T, H, K, V, layout, g_scale, init
    (1, 1, 2, 32, 32, "single", 1.0, False),
    (2, 75, 4, 32, 32, "varlen", 1.0, True),
    (2, 100, 2, 64, 64, "single", 0.1, True),
    (2, 37, 2, 32, 64, "leftpad", 8.0, True),
    (2, 64, 1, 64, 32, "rightpad", 1.0, False),
    (2, 1, 1, 32, 32, "varlen", 1.0, True),
    (2, 45, 2, 32, 32, "holes", 1.0, True),
]


def _rec_id(c):
    B, T, H, K, V, layout, g_scale, init = c
    return f"B{B}-T{T}-H{H}-K{K}-V{V}-{layout}-g{g_scale}" + ("-s0" if init else "")


@pytest.mark.parametrize("case", GDN_CASES, ids=_rec_id)
def test_gated_delta_rule(case):
    B, T, H, K, V, layout, g_scale, init = case
    rng = rng_for("gdn", case)
    q, k, v, g, beta, s0 = gdn_inputs(rng, B, T, H, K, V, g_scale, init)
    seg = make_segment_ids(B, T, layout)
    o, S = jcall(ops.gated_delta_rule_reference, *to_jnp(q, k, v, g, beta),
                 initial_state=None if s0 is None else jnp.asarray(s0), segment_ids=jnp.asarray(seg))
    o_ref, S_ref = oracles.gated_delta_rule(q, k, v, g, beta, initial_state=s0, segment_ids=seg)
    assert_close(o, o_ref, TOL_REC, "o")
    assert_close(S, S_ref, TOL_REC, "state")
    assert S.dtype == jnp.float32
    assert np.all(np.asarray(o)[seg == 0] == 0)


def test_gated_delta_rule_without_l2norm_custom_scale():
    B, T, H, K, V = 2, 50, 2, 32, 32
    rng = rng_for("gdn-nonorm")
    q, k, v, g, beta, s0 = gdn_inputs(rng, B, T, H, K, V, 1.0, True)
    k = k / np.linalg.norm(k, axis=-1, keepdims=True) * 0.9  # |k| < 1 keeps (I - beta k k^T) contractive
    seg = make_segment_ids(B, T, "varlen")
    o, S = jcall(ops.gated_delta_rule_reference, *to_jnp(q, k, v, g, beta), initial_state=jnp.asarray(s0),
                 segment_ids=jnp.asarray(seg), static=dict(scale=0.3, use_qk_l2norm=False))
    o_ref, S_ref = oracles.gated_delta_rule(q, k, v, g, beta, scale=0.3, initial_state=s0, segment_ids=seg,
                                            use_qk_l2norm=False)
    assert_close(o, o_ref, TOL_REC, "o")
    assert_close(S, S_ref, TOL_REC, "state")


def gla_inputs(rng, B, T, H, K, V, strong, init):
    q = silu(randn(rng, B, T, H, K)).astype(np.float32)
    k = softmax_np(randn(rng, B, T, H, K)).astype(np.float32)
    v = randn(rng, B, T, H, V)
    x = rng.standard_normal((B, T, H, K))
    gk = (log_sigmoid(x - 2.0) if strong else log_sigmoid(x) / 16).astype(np.float32)  # strong: mean ~ -2.3
    s0 = randn(rng, B, H, K, V, scale=0.5) if init else None
    return q, k, v, gk, s0


GLA_CASES = [
    # B, T, H, K, V, layout, strong, init
    (1, 1, 2, 32, 32, "single", False, False),
    (2, 75, 4, 32, 32, "varlen", False, True),
    (2, 100, 2, 64, 64, "single", True, True),
    (2, 37, 2, 32, 64, "leftpad", True, False),
    (2, 64, 1, 64, 32, "rightpad", False, True),
    (2, 45, 2, 32, 32, "holes", False, True),
]


def _gla_id(c):
    B, T, H, K, V, layout, strong, init = c
    return f"B{B}-T{T}-H{H}-K{K}-V{V}-{layout}" + ("-strong" if strong else "") + ("-s0" if init else "")


@pytest.mark.parametrize("case", GLA_CASES, ids=_gla_id)
def test_gla(case):
    B, T, H, K, V, layout, strong, init = case
    rng = rng_for("gla", case)
    q, k, v, gk, s0 = gla_inputs(rng, B, T, H, K, V, strong, init)
    seg = make_segment_ids(B, T, layout)
    o, S = jcall(ops.gla_reference, *to_jnp(q, k, v, gk), initial_state=None if s0 is None else jnp.asarray(s0),
                 segment_ids=jnp.asarray(seg))
    o_ref, S_ref = oracles.gla(q, k, v, gk, initial_state=s0, segment_ids=seg)
    assert_close(o, o_ref, TOL_REC, "o")
    assert_close(S, S_ref, TOL_REC, "state")
    assert np.all(np.asarray(o)[seg == 0] == 0)


# ----------------------------------------------------------------------------------------------- SSE
def test_topk_mask_and_route():
    rng = rng_for("route")
    logits = randn(rng, 2, 30, 4, scale=2.0)
    p, w, r = ops.sse_route(jnp.asarray(logits), 2, 1)
    p_ref, w_ref, r_ref = oracles.sse_route(logits, 2, 1)
    assert_close(p, p_ref, TOL_ELEMENTWISE)
    np.testing.assert_array_equal(np.asarray(w), w_ref)
    np.testing.assert_array_equal(np.asarray(r), r_ref)
    # ties go to the lower index (the official threshold + cumsum rule)
    tied = np.array([[0.25, 0.25, 0.25, 0.25], [0.1, 0.3, 0.3, 0.3], [0.4, 0.1, 0.4, 0.1]], np.float32)
    for kk in (1, 2, 3):
        np.testing.assert_array_equal(np.asarray(ops.topk_mask(jnp.asarray(tied), kk)), oracles.topk_mask(tied, kk))
    seg = make_segment_ids(2, 30, "varlen")
    loss = ops.sse_aux_loss(p, w, jnp.asarray(seg != 0), 2)
    np.testing.assert_allclose(float(loss), oracles.sse_aux_loss(np.asarray(p), np.asarray(w), seg != 0, 2),
                               rtol=TOL_ATTN)


def sse_inputs(rng, kind, B, T, H, K, N, nw, nr, init, strong=False):
    """q1, k1, q2, k2, v, gate, beta, p, write, read, s0 as the model feeds them (feature maps applied)."""
    act = lambda x: silu(x).astype(np.float32)  # noqa: E731
    q1, q2 = act(randn(rng, B, T, H, K)), act(randn(rng, B, T, H, K))
    if kind == "gla":
        k1, k2 = softmax_np(randn(rng, B, T, H, K)), softmax_np(randn(rng, B, T, H, K))
        x = rng.standard_normal((B, T, 2, H, K))
        gate = (log_sigmoid(x - 2.0) if strong else log_sigmoid(x) / 16).astype(np.float32)
        beta = None
    else:
        k1, k2 = act(randn(rng, B, T, H, K)), act(randn(rng, B, T, H, K))
        gate = (-np.log1p(np.exp(rng.standard_normal((B, T, 2, H))))).astype(np.float32)
        beta = (2 / (1 + np.exp(-2 * rng.standard_normal((B, T, 2, H))))).astype(np.float32)
    v = act(randn(rng, B, T, H, K))
    p, write, read = (np.asarray(a) for a in ops.sse_route(jnp.asarray(randn(rng, B, T, N, scale=2.0)), nw, nr))
    s0 = randn(rng, B, 1 + N, H, K, K, scale=0.5) if init else None
    return (q1, k1.astype(np.float32), q2, k2.astype(np.float32), v, gate, beta, p, write, read, s0)


def run_sse_op(kind, form, xs, seg):
    q1, k1, q2, k2, v, gate, beta, p, write, read, s0 = xs
    kw = dict(static=dict(form=form), segment_ids=jnp.asarray(seg),
              initial_state=None if s0 is None else jnp.asarray(s0))
    if kind == "gla":
        return jcall(ops.sse_gla_reference, *to_jnp(q1, k1, q2, k2, v, gate, p, write, read), **kw)
    return jcall(ops.sse_gdn_reference, *to_jnp(q1, k1, q2, k2, v, gate, beta, p, write, read), **kw)


def run_sse_oracle(kind, form, xs, seg, **extra):
    q1, k1, q2, k2, v, gate, beta, p, write, read, s0 = xs
    if form == "varlen":
        return oracles.sse_varlen(kind, q1, k1, q2, k2, v, gate, p, write, beta=beta, segment_ids=seg,
                                  initial_state=s0)
    return oracles.sse_mask(kind, q1, k1, q2, k2, v, gate, p, write, read, beta=beta, segment_ids=seg,
                            initial_state=s0, **extra)


SSE_CASES = [
    # B, T, H, K, N, nw, nr, layout, init
    (1, 1, 1, 32, 4, 2, 2, "single", False),
    (2, 75, 2, 32, 4, 2, 2, "varlen", True),
    (2, 50, 2, 32, 4, 1, 1, "leftpad", True),
    (1, 64, 1, 64, 3, 2, 2, "rightpad", False),
]
SSE_MASK_ONLY_CASES = [  # readers != writers: the mask form only (varlen requires readers == writers)
    (2, 40, 2, 32, 4, 1, 2, "varlen", True),
    (2, 40, 1, 32, 4, 3, 1, "single", False),
]


def _sse_id(c):
    B, T, H, K, N, nw, nr, layout, init = c
    return f"B{B}-T{T}-H{H}-D{K}-N{N}-w{nw}r{nr}-{layout}" + ("-s0" if init else "")


@pytest.mark.parametrize("kind", ["gdn", "gla"])
@pytest.mark.parametrize("case", SSE_CASES, ids=_sse_id)
def test_sse_varlen(kind, case):
    B, T, H, K, N, nw, nr, layout, init = case
    xs = sse_inputs(rng_for("sse", kind, case), kind, B, T, H, K, N, nw, nr, init, strong=layout == "leftpad")
    seg = make_segment_ids(B, T, layout)
    o, S = run_sse_op(kind, "varlen", xs, seg)
    o_ref, S_ref = run_sse_oracle(kind, "varlen", xs, seg)
    assert S.shape == (B, 1 + N, H, K, K)
    assert_close(o, o_ref, TOL_REC, "o")
    assert_close(S, S_ref, TOL_REC, "states")
    assert np.all(np.asarray(o)[seg == 0] == 0)


@pytest.mark.parametrize("kind", ["gdn", "gla"])
@pytest.mark.parametrize("case", SSE_CASES + SSE_MASK_ONLY_CASES, ids=_sse_id)
def test_sse_mask(kind, case):
    B, T, H, K, N, nw, nr, layout, init = case
    xs = sse_inputs(rng_for("sse", kind, case), kind, B, T, H, K, N, nw, nr, init)
    seg = make_segment_ids(B, T, layout)
    o, S = run_sse_op(kind, "mask", xs, seg)
    o_ref, S_ref = run_sse_oracle(kind, "mask", xs, seg)
    assert_close(o, o_ref, TOL_REC, "o")
    assert_close(S, S_ref, TOL_REC, "states")


@pytest.mark.parametrize("kind", ["gdn", "gla"])
def test_sse_forms_agree_when_readers_equal_writers(kind):
    B, T, H, K, N, nw = 2, 60, 2, 32, 4, 2
    xs = sse_inputs(rng_for("sse-forms", kind), kind, B, T, H, K, N, nw, nw, True)
    seg = make_segment_ids(B, T, "varlen")
    # the two official algorithms are the same function when readers == writers (float64, both oracles)
    o_v, S_v = run_sse_oracle(kind, "varlen", xs, seg)
    o_m, S_m = run_sse_oracle(kind, "mask", xs, seg)
    assert_close(o_m, o_v, 1e-12, "oracle forms, o")
    assert_close(S_m, S_v, 1e-12, "oracle forms, states")
    # and so are the two ops, up to float32 rounding
    o_jv, S_jv = run_sse_op(kind, "varlen", xs, seg)
    o_jm, S_jm = run_sse_op(kind, "mask", xs, seg)
    assert_close(o_jm, o_jv, TOL_REC, "op forms, o")
    assert_close(S_jm, S_jv, TOL_REC, "op forms, states")


def test_sse_gdn_mask_form_gates_with_read_mask():
    """Official quirk: the GDN mask form gates g and beta with the READ mask (GLA uses the write mask).

    With readers != writers a partition a token reads but does not write still decays (g * read) and runs a
    delta step with k = v = 0 (a no-op), and a partition it writes but does not read gets beta = 0 (its write
    is dropped). The op must reproduce that, and it must differ from the write-gated variant."""
    B, T, H, K, N = 2, 40, 2, 32, 4
    xs = sse_inputs(rng_for("sse-quirk"), "gdn", B, T, H, K, N, 1, 2, True)
    seg = make_segment_ids(B, T, "varlen")
    o, S = run_sse_op("gdn", "mask", xs, seg)
    o_read, S_read = run_sse_oracle("gdn", "mask", xs, seg, gdn_gate_mask="read")
    o_write, _ = run_sse_oracle("gdn", "mask", xs, seg, gdn_gate_mask="write")
    assert_close(o, o_read, TOL_REC)
    assert_close(S, S_read, TOL_REC)
    assert rel_err(o_write, o_read) > 1e-2  # the quirk is visible, not a rounding-level effect
    # with readers == writers the masks coincide and the quirk disappears
    xs_eq = sse_inputs(rng_for("sse-quirk-eq"), "gdn", B, T, H, K, N, 2, 2, True)
    a, _ = run_sse_oracle("gdn", "mask", xs_eq, seg, gdn_gate_mask="read")
    b, _ = run_sse_oracle("gdn", "mask", xs_eq, seg, gdn_gate_mask="write")
    assert_close(a, b, 1e-14)


# ----------------------------------------------------------------------------------------------- gradients
def _finite_tree(tree):
    return all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree_util.tree_leaves(tree))


def test_grads_finite_recurrences():
    B, T, H, K, V = 2, 30, 2, 16, 16
    seg = jnp.asarray(make_segment_ids(B, T, "varlen"))
    q, k, v, g, beta, s0 = to_jnp(*gdn_inputs(rng_for("grad-gdn"), B, T, H, K, V, 8.0, True))

    def loss_gdn(q, k, v, g, beta, s0):
        o, S = ops.gated_delta_rule_reference(q, k, v, g, beta, initial_state=s0, segment_ids=seg)
        return jnp.sum(o ** 2) + jnp.sum(S ** 2)

    grads = jax.jit(jax.grad(loss_gdn, argnums=tuple(range(6))))(q, k, v, g, beta, s0)
    assert _finite_tree(grads)
    assert float(jnp.abs(grads[3]).sum()) > 0  # the gates do receive gradient

    q, k, v, gk, s0 = to_jnp(*gla_inputs(rng_for("grad-gla"), B, T, H, K, V, True, True))

    def loss_gla(q, k, v, gk, s0):
        o, S = ops.gla_reference(q, k, v, gk, initial_state=s0, segment_ids=seg)
        return jnp.sum(o ** 2) + jnp.sum(S ** 2)

    assert _finite_tree(jax.jit(jax.grad(loss_gla, argnums=tuple(range(5))))(q, k, v, gk, s0))


@pytest.mark.parametrize("kind,form", [
    ("gdn", "mask"),  # l2norm of the all-zero q / k rows of non-members: the eps must keep the gradient finite
    ("gla", "varlen"),
    pytest.param("gdn", "varlen", marks=pytest.mark.slow),
    pytest.param("gla", "mask", marks=pytest.mark.slow),
])
def test_grads_finite_sse(kind, form):
    B, T, H, K, N = 2, 24, 1, 16, 4
    xs = sse_inputs(rng_for("grad-sse", kind), kind, B, T, H, K, N, 2, 2, True)
    seg = make_segment_ids(B, T, "varlen")
    float_idx = [i for i, x in enumerate(xs) if x is not None and x.dtype == np.float32]

    def loss(*fl):
        args = list(xs)
        for i, x in zip(float_idx, fl):
            args[i] = x
        o, S = run_sse_op(kind, form, args, seg)
        return jnp.sum(o ** 2) + jnp.sum(S ** 2)

    grads = jax.jit(jax.grad(loss, argnums=tuple(range(len(float_idx)))))(*[jnp.asarray(xs[i]) for i in float_idx])
    assert _finite_tree(grads)


def test_grads_finite_attention_with_padding():
    B, T, N, KV, D = 2, 30, 4, 2, 32
    rng = rng_for("grad-attn")
    q, k, v = to_jnp(randn(rng, B, T, N, D), randn(rng, B, T, KV, D), randn(rng, B, T, KV, D))
    seg = jnp.asarray(make_segment_ids(B, T, "varlen"))
    f_attn = lambda q, k, v: jnp.sum(ops.attention_reference(q, k, v, segment_ids=seg, window=8) ** 2)  # noqa
    f_moba = lambda q, k, v: jnp.sum(  # noqa: E731
        ops.moba_attention_reference(q, k, v, chunk_size=4, topk=2, segment_ids=seg) ** 2)
    assert _finite_tree(jax.jit(jax.grad(f_attn, argnums=(0, 1, 2)))(q, k, v))
    assert _finite_tree(jax.jit(jax.grad(f_moba, argnums=(0, 1, 2)))(q, k, v))


def test_gated_delta_rule_grad_matches_finite_difference_x64():
    """jax.grad of the float64 op against central differences of the same op, along random directions."""
    B, T, H, K, V = 1, 9, 2, 8, 8
    seg = make_segment_ids(B, T, "varlen")
    with x64():
        rng = rng_for("fd-gdn")
        args = [np.asarray(a, np.float64) for a in gdn_inputs(rng, B, T, H, K, V, 1.0, True)]
        wo, ws = rng.standard_normal((B, T, H, V)), rng.standard_normal((B, H, K, V))

        def loss(q, k, v, g, beta, s0):
            o, S = ops.gated_delta_rule_reference(q, k, v, g, beta, initial_state=s0, segment_ids=jnp.asarray(seg))
            return jnp.sum(o * wo) + jnp.sum(S * ws)

        loss = jax.jit(loss)
        args_j = [jnp.asarray(a) for a in args]
        assert loss(*args_j).dtype == jnp.float64
        grads = jax.jit(jax.grad(loss, argnums=tuple(range(6))))(*args_j)
        eps = 1e-6
        for i, (a, gr) in enumerate(zip(args, grads)):
            d = rng.standard_normal(a.shape)
            plus = [jnp.asarray(x + eps * d) if j == i else x for j, x in enumerate(args_j)]
            minus = [jnp.asarray(x - eps * d) if j == i else x for j, x in enumerate(args_j)]
            fd = (float(loss(*plus)) - float(loss(*minus))) / (2 * eps)
            an = float(jnp.sum(gr * d))
            # central difference: truncation O(eps^2) ~ 1e-12, rounding ~ 1e-16 / eps ~ 1e-10 (relative)
            assert abs(fd - an) <= 1e-7 * max(1.0, abs(an)), (i, fd, an)


# ----------------------------------------------------------------------------------------------- float64 mode
def test_ops_match_oracles_in_float64():
    """With float64 inputs the ops compute in float64, so they must match the oracles to ~1e-10: this pins
    details float32 tolerances cannot see (eps placement, scale, masking)."""
    B, T = 2, 37
    seg = make_segment_ids(B, T, "varlen")
    with x64():
        rng = rng_for("x64")
        j = lambda *xs: tuple(jnp.asarray(np.asarray(x, np.float64)) for x in xs)  # noqa: E731
        x, w = rng.standard_normal((B, T, 32)), rng.standard_normal(32)
        y = jcall(ops.rms_norm, *j(x, w), 1e-5)
        assert y.dtype == jnp.float64
        assert_close(y, oracles.rms_norm(x, w, 1e-5), TOL_X64)
        assert_close(jcall(ops.l2_norm, *j(x)), oracles.l2norm(x), TOL_X64)
        pos = oracles.segment_positions(seg)
        xr = rng.standard_normal((B, T, 2, 32))
        assert_close(jcall(ops.apply_rope, *j(xr), jnp.asarray(pos), static=dict(theta=1e4)),
                     oracles.rope(xr, pos, 1e4), TOL_X64)

        q, k, v = rng.standard_normal((B, T, 4, 32)), rng.standard_normal((B, T, 2, 32)), rng.standard_normal(
            (B, T, 2, 32))
        assert_close(jcall(ops.attention_reference, *j(q, k, v), segment_ids=jnp.asarray(seg), static=dict(window=6)),
                     oracles.attention(q, k, v, seg, window=6), TOL_X64)
        assert_close(jcall(ops.moba_attention_reference, *j(q, k, v), segment_ids=jnp.asarray(seg),
                           static=dict(chunk_size=5, topk=2)),
                     oracles.moba_attention(q, k, v, 5, 2, seg), TOL_X64)

        q, k, v, g, beta, s0 = gdn_inputs(rng, B, T, 2, 16, 16, 1.0, True)
        o, S = jcall(ops.gated_delta_rule_reference, *j(q, k, v, g, beta), initial_state=j(s0)[0],
                     segment_ids=jnp.asarray(seg))
        o_ref, S_ref = oracles.gated_delta_rule(q, k, v, g, beta, initial_state=s0, segment_ids=seg)
        assert o.dtype == S.dtype == jnp.float64
        assert_close(o, o_ref, TOL_X64)
        assert_close(S, S_ref, TOL_X64)

        q, k, v, gk, s0 = gla_inputs(rng, B, T, 2, 16, 16, True, True)
        o, S = jcall(ops.gla_reference, *j(q, k, v, gk), initial_state=j(s0)[0], segment_ids=jnp.asarray(seg))
        o_ref, S_ref = oracles.gla(q, k, v, gk, initial_state=s0, segment_ids=seg)
        assert_close(o, o_ref, TOL_X64)
        assert_close(S, S_ref, TOL_X64)


@pytest.mark.parametrize("kind,form", [
    ("gdn", "varlen"),  # l2norm(q * p_n): the eps-inside-sqrt effect (~1e-6) is only visible in float64
    ("gdn", "mask"),
    ("gla", "varlen"),
    pytest.param("gla", "mask", marks=pytest.mark.slow),
])
def test_sse_matches_oracle_in_float64(kind, form):
    B, T = 2, 37
    seg = make_segment_ids(B, T, "varlen")
    with x64():
        xs = sse_inputs(rng_for("x64-sse", kind), kind, B, T, 1, 16, 4, 2, 2, True)
        xs = tuple(None if a is None else np.asarray(a, np.float64) if a.dtype == np.float32 else a for a in xs)
        o, S = run_sse_op(kind, form, xs, seg)
        assert o.dtype == S.dtype == jnp.float64
        o_ref, S_ref = run_sse_oracle(kind, form, xs, seg)
        assert_close(o, o_ref, TOL_X64, "o")
        assert_close(S, S_ref, TOL_X64, "states")
