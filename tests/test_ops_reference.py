"""spb2_jax.ops reference implementations against the float64 NumPy oracles in tests/oracles.py (error metric
and bounds: ``tests/helpers.py``, "references vs oracles")."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spb2_jax import ops
from tests import oracles
from tests.helpers import (TOL_ATTN, TOL_ELEMENTWISE, TOL_REC, TOL_ROPE, TOL_X64, assert_close, attn_inputs,
                           gdn_inputs, gla_inputs, make_segment_ids, randn, rel_err, rng_for, shape_id,
                           sse_inputs)

pytestmark = pytest.mark.usefixtures("fast_compiles")  # ~70 small programs: compile time dominates


def jcall(fn, *args, static=None, **kwargs):
    """``fn(*args, **kwargs)`` under one ``jax.jit`` (``static`` kwargs bound first): one compile per call
    instead of one per eager primitive, which is what keeps this file fast on CPU."""
    return jax.jit(functools.partial(fn, **(static or {})))(*args, **kwargs)


def to_jnp(*xs):
    return tuple(None if x is None else jnp.asarray(x) for x in xs)


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
@pytest.mark.parametrize("shape", [(1, 1, 32), (2, 7, 3, 64)], ids=["B1-T1-D32", "B2-T7-N3-H64"])
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


ROPE_CASES = [(1, 1, 1, 32, "single"), (2, 75, 4, 64, "varlen"), (2, 40, 2, 32, "leftpad"), (2, 45, 2, 32, "holes")]


@pytest.mark.parametrize("B,T,N,H,layout", ROPE_CASES,
                         ids=[shape_id(layout, B=B, T=T, N=N, H=H) for B, T, N, H, layout in ROPE_CASES])
def test_segment_positions_and_rope(B, T, N, H, layout):
    seg = make_segment_ids(B, T, layout)
    pos = np.asarray(jcall(ops.segment_positions, jnp.asarray(seg)))
    real = seg != 0
    np.testing.assert_array_equal(pos[real], oracles.segment_positions(seg)[real])
    rng = rng_for("rope", B, T, N, H)
    x = randn(rng, B, T, N, H)
    assert_close(jcall(ops.apply_rope, jnp.asarray(x), jnp.asarray(pos), static=dict(theta=1e4)),
                 oracles.rope(x, pos, 1e4), TOL_ROPE)
    # explicit, larger positions (incl. decode-like offsets) and another theta
    pos2 = rng.integers(0, 120, (B, T)).astype(np.int32)
    assert_close(jcall(ops.apply_rope, jnp.asarray(x), jnp.asarray(pos2), static=dict(theta=5e5)),
                 oracles.rope(x, pos2, 5e5), TOL_ROPE)


# ----------------------------------------------------------------------------------------------- attention
ATTN_CASES = [
    # B, T, N, K, H, window, layout, causal
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
    B, T, N, K, H, window, layout, causal = c
    return shape_id(layout, "" if causal else "noncausal", B=B, T=T, N=N, K=K, H=H, W=window)


@pytest.mark.parametrize("case", ATTN_CASES, ids=_attn_id)
def test_attention(case):
    B, T, N, K, H, window, layout, causal = case
    q, k, v = attn_inputs(rng_for("attn", case), B, T, N, K, H).values()
    seg = make_segment_ids(B, T, layout)
    out = jcall(ops.attention_reference, *to_jnp(q, k, v), segment_ids=jnp.asarray(seg),
                static=dict(causal=causal, window=window))
    ref = oracles.attention(q, k, v, seg, causal=causal, window=window)
    assert_close(out, ref, TOL_ATTN)
    assert np.all(np.asarray(out)[seg == 0] == 0), "padding queries must output exact zeros"


def test_attention_custom_scale_and_no_segments():
    q, k, v = attn_inputs(rng_for("attn-scale"), 2, 20, 4, 2, 32).values()
    out = jcall(ops.attention_reference, *to_jnp(q, k, v), static=dict(scale=0.3, window=5))
    assert_close(out, oracles.attention(q, k, v, None, causal=True, window=5, scale=0.3), TOL_ATTN)


# ----------------------------------------------------------------------------------------------- MoBA
MOBA_CASES = [
    # B, T, N, K, H, chunk, topk, layout
    (1, 1, 2, 1, 32, 16, 2, "single"),
    (2, 75, 4, 1, 32, 16, 3, "varlen"),
    (2, 75, 4, 2, 64, 16, 2, "varlen"),
    (1, 100, 4, 4, 32, 8, 4, "single"),
    (2, 90, 4, 2, 64, 16, 1, "leftpad"),  # topk 1 with K > 1 crashed before the moba_selection fix
    (2, 50, 4, 2, 32, 7, 3, "rightpad"),
    (2, 45, 4, 2, 32, 6, 3, "holes"),
]


def _moba_id(c):
    B, T, N, K, H, C, topk, layout = c
    return shape_id(layout, B=B, T=T, N=N, K=K, H=H, C=C, top=topk)


@pytest.mark.parametrize("case", MOBA_CASES, ids=_moba_id)
def test_moba(case):
    B, T, N, K, H, C, topk, layout = case
    q, k, v = attn_inputs(rng_for("moba", case), B, T, N, K, H).values()
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


@pytest.mark.parametrize("layout", ["single", "varlen"])
@pytest.mark.parametrize("topk", [5, 9], ids=lambda k: f"B2-T75-N4-K2-H32-C16-top{k}")
def test_moba_topk_ge_blocks_is_dense_causal(topk, layout):
    B, T, N, K, H, C = 2, 75, 4, 2, 32, 16  # 5 blocks
    q, k, v = attn_inputs(rng_for("moba-dense", topk, layout), B, T, N, K, H).values()
    seg = jnp.asarray(make_segment_ids(B, T, layout))
    out = jcall(ops.moba_attention_reference, *to_jnp(q, k, v), segment_ids=seg, static=dict(chunk_size=C, topk=topk))
    dense = jcall(ops.attention_reference, *to_jnp(q, k, v), segment_ids=seg)
    # same masks, same arithmetic: only float32 reassociation can differ
    assert_close(out, dense, 1e-6)
    assert_close(out, oracles.attention(q, k, v, np.asarray(seg)), TOL_ATTN)


# ----------------------------------------------------------------------------------------------- recurrences
GDN_CASES = [
    # B, T, N, H, E, layout, g_scale, init
    (1, 1, 2, 32, 32, "single", 1.0, False),
    (2, 75, 4, 32, 32, "varlen", 1.0, True),
    (2, 100, 2, 64, 64, "single", 0.1, True),
    (2, 37, 2, 32, 64, "leftpad", 8.0, True),
    (2, 64, 1, 64, 32, "rightpad", 1.0, False),
    (2, 1, 1, 32, 32, "varlen", 1.0, True),
    (2, 45, 2, 32, 32, "holes", 1.0, True),
]


def _rec_id(c):
    B, T, N, H, E, layout, g_scale, init = c
    return shape_id(layout, f"g{g_scale}", "s0" if init else "", B=B, T=T, N=N, H=H, E=E)


@pytest.mark.parametrize("case", GDN_CASES, ids=_rec_id)
def test_gated_delta_rule(case):
    B, T, N, H, E, layout, g_scale, init = case
    rng = rng_for("gdn", case)
    q, k, v, g, beta, s0 = gdn_inputs(rng, B, T, N, H, E, g_scale, init)
    seg = make_segment_ids(B, T, layout)
    o, S = jcall(ops.gated_delta_rule_reference, *to_jnp(q, k, v, g, beta),
                 initial_state=None if s0 is None else jnp.asarray(s0), segment_ids=jnp.asarray(seg))
    o_ref, S_ref = oracles.gated_delta_rule(q, k, v, g, beta, initial_state=s0, segment_ids=seg)
    assert_close(o, o_ref, TOL_REC, "o")
    assert_close(S, S_ref, TOL_REC, "state")
    assert S.dtype == jnp.float32
    assert np.all(np.asarray(o)[seg == 0] == 0)


def test_gated_delta_rule_without_l2norm_custom_scale():
    B, T, N, H, E = 2, 50, 2, 32, 32
    rng = rng_for("gdn-nonorm")
    q, k, v, g, beta, s0 = gdn_inputs(rng, B, T, N, H, E, 1.0, True)
    k = k / np.linalg.norm(k, axis=-1, keepdims=True) * 0.9  # |k| < 1 keeps (I - beta k k^T) contractive
    seg = make_segment_ids(B, T, "varlen")
    o, S = jcall(ops.gated_delta_rule_reference, *to_jnp(q, k, v, g, beta), initial_state=jnp.asarray(s0),
                 segment_ids=jnp.asarray(seg), static=dict(scale=0.3, use_qk_l2norm=False))
    o_ref, S_ref = oracles.gated_delta_rule(q, k, v, g, beta, scale=0.3, initial_state=s0, segment_ids=seg,
                                            use_qk_l2norm=False)
    assert_close(o, o_ref, TOL_REC, "o")
    assert_close(S, S_ref, TOL_REC, "state")


GLA_CASES = [
    # B, T, N, H, E, layout, decay, init
    (1, 1, 2, 32, 32, "single", "weak", False),
    (2, 75, 4, 32, 32, "varlen", "weak", True),
    (2, 100, 2, 64, 64, "single", "strong", True),
    (2, 37, 2, 32, 64, "leftpad", "strong", False),
    (2, 64, 1, 64, 32, "rightpad", "weak", True),
    (2, 45, 2, 32, 32, "holes", "weak", True),
]


def _gla_id(c):
    B, T, N, H, E, layout, decay, init = c
    return shape_id(layout, decay, "s0" if init else "", B=B, T=T, N=N, H=H, E=E)


@pytest.mark.parametrize("case", GLA_CASES, ids=_gla_id)
def test_gla(case):
    B, T, N, H, E, layout, decay, init = case
    q, k, v, gk, s0 = gla_inputs(rng_for("gla", case), B, T, N, H, E, decay, init)
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
    # B, T, N, H, P, nw, nr, layout, init
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
    B, T, N, H, P, nw, nr, layout, init = c
    return shape_id(f"w{nw}r{nr}", layout, "s0" if init else "", B=B, T=T, N=N, H=H, P=P)


@pytest.mark.parametrize("case", SSE_CASES, ids=_sse_id)
@pytest.mark.parametrize("kind", ["gdn", "gla"])
def test_sse_varlen(kind, case):
    B, T, N, H, P, nw, nr, layout, init = case
    xs = sse_inputs(rng_for("sse", kind, case), kind, B, T, N, H, P, nw, nr, init, strong=layout == "leftpad")
    seg = make_segment_ids(B, T, layout)
    o, S = run_sse_op(kind, "varlen", xs, seg)
    o_ref, S_ref = run_sse_oracle(kind, "varlen", xs, seg)
    assert S.shape == (B, 1 + P, N, H, H)
    assert_close(o, o_ref, TOL_REC, "o")
    assert_close(S, S_ref, TOL_REC, "states")
    assert np.all(np.asarray(o)[seg == 0] == 0)


@pytest.mark.parametrize("case", SSE_CASES + SSE_MASK_ONLY_CASES, ids=_sse_id)
@pytest.mark.parametrize("kind", ["gdn", "gla"])
def test_sse_mask(kind, case):
    B, T, N, H, P, nw, nr, layout, init = case
    xs = sse_inputs(rng_for("sse", kind, case), kind, B, T, N, H, P, nw, nr, init)
    seg = make_segment_ids(B, T, layout)
    o, S = run_sse_op(kind, "mask", xs, seg)
    o_ref, S_ref = run_sse_oracle(kind, "mask", xs, seg)
    assert_close(o, o_ref, TOL_REC, "o")
    assert_close(S, S_ref, TOL_REC, "states")


@pytest.mark.parametrize("kind", ["gdn", "gla"])
def test_sse_forms_agree_when_readers_equal_writers(kind):
    B, T, N, H, P, nw = 2, 60, 2, 32, 4, 2
    xs = sse_inputs(rng_for("sse-forms", kind), kind, B, T, N, H, P, nw, nw, True)
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
    B, T, N, H, P = 2, 40, 2, 32, 4
    xs = sse_inputs(rng_for("sse-quirk"), "gdn", B, T, N, H, P, 1, 2, True)
    seg = make_segment_ids(B, T, "varlen")
    o, S = run_sse_op("gdn", "mask", xs, seg)
    o_read, S_read = run_sse_oracle("gdn", "mask", xs, seg, gdn_gate_mask="read")
    o_write, _ = run_sse_oracle("gdn", "mask", xs, seg, gdn_gate_mask="write")
    assert_close(o, o_read, TOL_REC)
    assert_close(S, S_read, TOL_REC)
    assert rel_err(o_write, o_read) > 1e-2  # the quirk is visible, not a rounding-level effect
    # with readers == writers the masks coincide and the quirk disappears
    xs_eq = sse_inputs(rng_for("sse-quirk-eq"), "gdn", B, T, N, H, P, 2, 2, True)
    a, _ = run_sse_oracle("gdn", "mask", xs_eq, seg, gdn_gate_mask="read")
    b, _ = run_sse_oracle("gdn", "mask", xs_eq, seg, gdn_gate_mask="write")
    assert_close(a, b, 1e-14)


# ----------------------------------------------------------------------------------------------- gradients
def _finite_tree(tree):
    return all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree_util.tree_leaves(tree))


def test_grads_finite_recurrences():
    B, T, N, H, E = 2, 30, 2, 16, 16
    seg = jnp.asarray(make_segment_ids(B, T, "varlen"))
    q, k, v, g, beta, s0 = to_jnp(*gdn_inputs(rng_for("grad-gdn"), B, T, N, H, E, 8.0, True))

    def loss_gdn(q, k, v, g, beta, s0):
        o, S = ops.gated_delta_rule_reference(q, k, v, g, beta, initial_state=s0, segment_ids=seg)
        return jnp.sum(o ** 2) + jnp.sum(S ** 2)

    grads = jax.jit(jax.grad(loss_gdn, argnums=tuple(range(6))))(q, k, v, g, beta, s0)
    assert _finite_tree(grads)
    assert float(jnp.abs(grads[3]).sum()) > 0  # the gates do receive gradient

    q, k, v, gk, s0 = to_jnp(*gla_inputs(rng_for("grad-gla"), B, T, N, H, E, "strong", True))

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
    B, T, N, H, P = 2, 24, 1, 16, 4
    xs = sse_inputs(rng_for("grad-sse", kind), kind, B, T, N, H, P, 2, 2, True)
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
    B, T, N, K, H = 2, 30, 4, 2, 32
    q, k, v = to_jnp(*attn_inputs(rng_for("grad-attn"), B, T, N, K, H).values())
    seg = jnp.asarray(make_segment_ids(B, T, "varlen"))
    f_attn = lambda q, k, v: jnp.sum(ops.attention_reference(q, k, v, segment_ids=seg, window=8) ** 2)  # noqa
    f_moba = lambda q, k, v: jnp.sum(  # noqa: E731
        ops.moba_attention_reference(q, k, v, chunk_size=4, topk=2, segment_ids=seg) ** 2)
    assert _finite_tree(jax.jit(jax.grad(f_attn, argnums=(0, 1, 2)))(q, k, v))
    assert _finite_tree(jax.jit(jax.grad(f_moba, argnums=(0, 1, 2)))(q, k, v))


def test_gated_delta_rule_grad_matches_finite_difference_x64():
    """jax.grad of the float64 op against central differences of the same op, along random directions."""
    B, T, N, H, E = 1, 9, 2, 8, 8
    seg = make_segment_ids(B, T, "varlen")
    with x64():
        rng = rng_for("fd-gdn")
        args = [np.asarray(a, np.float64) for a in gdn_inputs(rng, B, T, N, H, E, 1.0, True)]
        wo, ws = rng.standard_normal((B, T, N, E)), rng.standard_normal((B, N, H, E))

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

        q, k, v, gk, s0 = gla_inputs(rng, B, T, 2, 16, 16, "strong", True)
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
