"""Fast ("xla") token-mixing paths against the per-token / dense references (and the float64 oracles).

Every case checks the forward outputs AND gradients with ``helpers.compare``: ``jax.grad`` of ``sum_i <w_i, out_i>``
(random weights ``w_i``; for recurrences ``out`` includes the final state) with respect to every floating input,
within the bounds derived in ``tests/helpers.py``. float32 runs every case; bfloat16 (slow) the varlen and holes
layouts.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spb2_jax.ops.attention import attention_reference
from spb2_jax.ops.gdn_chunked import chunk_gated_delta_rule
from spb2_jax.ops.gla_chunked import chunk_gla
from spb2_jax.ops.moba import moba_attention_reference
from spb2_jax.ops.moba_blockwise import causal_attention, moba_attention
from spb2_jax.ops.recurrent import gated_delta_rule_reference, gla_reference
from spb2_jax.ops.sse import sse_gdn, sse_gla
from spb2_jax.ops.swa_blockwise import sliding_window_attention
from spb2_jax.options import Kernels
from tests import oracles
from tests.helpers import (BF16_OUT_RTOL, F32_ATOL, F32_RTOL, TOL_REC, attn_inputs, check, compare, gdn_inputs,
                           gla_inputs, make_segment_ids, randn, rng_for, shape_id, sse_inputs)

pytestmark = pytest.mark.usefixtures("fast_compiles")  # compile time dominates
BF16_LAYOUTS = ("varlen", "holes")


def grid(cases, ids, bf16_ok):
    """``pytest.param(*case, dtype)``: float32 for every case, bfloat16 (marked slow) where ``bf16_ok(*case)``."""
    out = []
    for case, case_id in zip(cases, ids):
        out.append(pytest.param(*case, jnp.float32, id=f"{case_id}-f32"))
        if bf16_ok(*case):
            out.append(pytest.param(*case, jnp.bfloat16, id=f"{case_id}-bf16", marks=pytest.mark.slow))
    return out


# ----------------------------------------------------------------------------------------------- gated delta rule
GDN_CASES = [
    # B, T, N, H, E, C, layout, g_scale, init
    (1, 1, 2, 64, 64, 16, "single", 1.0, False),
    (2, 75, 2, 64, 64, 16, "varlen", 1.0, True),
    (2, 45, 2, 64, 32, 16, "holes", 1.0, True),
    (2, 37, 1, 64, 64, 16, "leftpad", 8.0, True),
    (2, 40, 2, 32, 32, 16, "rightpad", 0.1, False),
    (2, 30, 1, 32, 32, 8, "short", 1.0, True),
    (1, 24, 1, 128, 128, 16, "varlen", 1.0, True),
]


def _rec_id(c):
    B, T, N, H, E, C, layout, gate, init = c
    return shape_id(layout, f"g{gate}" if isinstance(gate, float) else gate, "s0" if init else "",
                    B=B, T=T, N=N, H=H, E=E, C=C)


@pytest.mark.parametrize("case,dtype", grid([(c,) for c in GDN_CASES], map(_rec_id, GDN_CASES),
                                            lambda c: c[6] in BF16_LAYOUTS))
def test_chunk_gated_delta_rule(case, dtype):
    B, T, N, H, E, C, layout, g_scale, init = case
    q, k, v, g, beta, s0 = gdn_inputs(rng_for("fast-gdn", case), B, T, N, H, E, g_scale, init)
    assert beta.max() > 1.0  # negative eigenvalues are exercised
    seg = jnp.asarray(make_segment_ids(B, T, layout))
    inputs = dict(q=q, k=k, v=v, g=g, beta=beta)
    if init:
        inputs["s0"] = s0

    def run(fn, **kw):
        return lambda x: fn(x["q"], x["k"], x["v"], x["g"], x["beta"], initial_state=x.get("s0"),
                            segment_ids=seg, **kw)

    out_f, out_r = compare("gdn", run(chunk_gated_delta_rule, chunk_size=C), run(gated_delta_rule_reference),
                           inputs, dtype)
    assert np.all(np.asarray(out_f[0], np.float32)[np.asarray(seg) == 0] == 0)
    if dtype == jnp.float32:
        o_ref, S_ref = oracles.gated_delta_rule(q, k, v, g, beta, initial_state=s0, segment_ids=np.asarray(seg))
        check("gdn vs oracle out", out_f[0], o_ref, TOL_REC, 0.0)
        check("gdn vs oracle state", out_f[1], S_ref, TOL_REC, 0.0)


# ----------------------------------------------------------------------------------------------- GLA
GLA_CASES = [
    # B, T, N, H, E, C, layout, decay, init
    (1, 1, 2, 64, 64, 16, "single", "weak", False),
    (2, 75, 2, 64, 64, 16, "varlen", "weak", True),
    (2, 75, 2, 64, 64, 16, "varlen", "extreme", True),
    (2, 45, 2, 32, 64, 16, "holes", "extreme", True),
    (2, 37, 1, 64, 64, 16, "leftpad", "weak", True),
    (2, 40, 2, 32, 32, 16, "rightpad", "extreme", False),
    (2, 30, 1, 32, 32, 8, "short", "weak", True),
    (1, 24, 1, 128, 128, 16, "varlen", "extreme", True),
]


@pytest.mark.parametrize("case,dtype", grid([(c,) for c in GLA_CASES], map(_rec_id, GLA_CASES),
                                            lambda c: c[6] in BF16_LAYOUTS))
def test_chunk_gla(case, dtype):
    B, T, N, H, E, C, layout, decay, init = case
    q, k, v, gk, s0 = gla_inputs(rng_for("fast-gla", case), B, T, N, H, E, decay, init)
    seg = jnp.asarray(make_segment_ids(B, T, layout))
    inputs = dict(q=q, k=k, v=v, gk=gk)
    if init:
        inputs["s0"] = s0

    def run(fn, **kw):
        return lambda x: fn(x["q"], x["k"], x["v"], x["gk"], initial_state=x.get("s0"), segment_ids=seg, **kw)

    out_f, _ = compare("gla", run(chunk_gla, chunk_size=C), run(gla_reference), inputs, dtype)
    assert np.all(np.asarray(out_f[0], np.float32)[np.asarray(seg) == 0] == 0)
    if dtype == jnp.float32:
        o_ref, S_ref = oracles.gla(q, k, v, gk, initial_state=s0, segment_ids=np.asarray(seg))
        check("gla vs oracle out", out_f[0], o_ref, TOL_REC, 0.0)
        check("gla vs oracle state", out_f[1], S_ref, TOL_REC, 0.0)


# ----------------------------------------------------------------------------------------------- attention
ATTN_CASES = [
    # B, T, H, K, H, layout
    (1, 1, 2, 1, 64, "single"),
    (2, 75, 4, 1, 64, "varlen"),
    (2, 75, 4, 2, 64, "holes"),
    (2, 40, 2, 2, 64, "leftpad"),
    (2, 40, 2, 1, 64, "rightpad"),
    (2, 30, 2, 2, 32, "short"),
    (1, 24, 2, 1, 128, "varlen"),
]


def _attn_id(c, W=None, C=None, top=None):
    B, T, N, K, H, layout = c
    return shape_id(layout, B=B, T=T, N=N, K=K, H=H, W=W, C=C, top=top, tile=16)


def _attn_inputs(key, B, T, N, K, H):
    return attn_inputs(rng_for("fast-attn", key), B, T, N, K, H, scale=1.5)


SWA_CASES = [(c, w) for c in ATTN_CASES
             for w in ((5, 40) if c[5] == "varlen" and c[1] >= 40 else (5 if c[1] >= 40 else 3,))]


@pytest.mark.parametrize("case,window,dtype", grid(SWA_CASES, [_attn_id(c, W=w) for c, w in SWA_CASES],
                                                   lambda c, w: c[5] in BF16_LAYOUTS))
def test_sliding_window_attention(case, window, dtype):
    B, T, N, K, H, layout = case
    seg = jnp.asarray(make_segment_ids(B, T, layout))
    x = _attn_inputs((case, window), B, T, N, K, H)
    fast = lambda a: (sliding_window_attention(a["q"], a["k"], a["v"], window=window, segment_ids=seg,  # noqa
                                               block_size=16),)
    ref = lambda a: (attention_reference(a["q"], a["k"], a["v"], segment_ids=seg, causal=True, window=window),)  # noqa
    out_f, _ = compare("swa", fast, ref, x, dtype)
    assert np.all(np.asarray(out_f[0], np.float32)[np.asarray(seg) == 0] == 0)


@pytest.mark.parametrize("case,dtype", grid([(c,) for c in ATTN_CASES], map(_attn_id, ATTN_CASES),
                                            lambda c: c[5] in BF16_LAYOUTS))
def test_causal_attention(case, dtype):
    B, T, N, K, H, layout = case
    seg = jnp.asarray(make_segment_ids(B, T, layout))
    x = _attn_inputs(case, B, T, N, K, H)
    fast = lambda a: (causal_attention(a["q"], a["k"], a["v"], segment_ids=seg, block_size=16),)  # noqa
    ref = lambda a: (attention_reference(a["q"], a["k"], a["v"], segment_ids=seg, causal=True),)  # noqa
    out_f, _ = compare("causal", fast, ref, x, dtype)
    assert np.all(np.asarray(out_f[0], np.float32)[np.asarray(seg) == 0] == 0)


MOBA_CASES = [(c, C, topk) for i, c in enumerate(ATTN_CASES)
              for C, topk in (((16, 2), (8, 3), (16, 8)) if c[5] == "varlen" and c[1] >= 40 else
                              (((16, 2), (8, 3), (16, 8))[i % 3],))]


@pytest.mark.parametrize("case,C,topk,dtype", grid(MOBA_CASES, [_attn_id(c, C=C, top=k) for c, C, k in MOBA_CASES],
                                                  lambda c, C, k: c[5] in BF16_LAYOUTS and C != 8))
def test_moba_attention(case, C, topk, dtype):
    B, T, N, K, H, layout = case
    seg = jnp.asarray(make_segment_ids(B, T, layout))
    x = _attn_inputs((case, C, topk), B, T, N, K, H)
    fast = lambda a: (moba_attention(a["q"], a["k"], a["v"], chunk_size=C, topk=topk, segment_ids=seg,  # noqa
                                     block_size=16),)
    ref = lambda a: (moba_attention_reference(a["q"], a["k"], a["v"], chunk_size=C, topk=topk,  # noqa
                                              segment_ids=seg),)
    out_f, out_r = compare("moba", fast, ref, x, dtype)
    assert np.all(np.asarray(out_f[0], np.float32)[np.asarray(seg) == 0] == 0)
    if topk * C >= T:  # topk >= number of blocks: MoBA is dense causal attention
        q, k, v = (jnp.asarray(jnp.asarray(x[n], dtype), jnp.float32) for n in "qkv")
        dense = jax.jit(lambda q, k, v: attention_reference(q, k, v, segment_ids=seg, causal=True))(q, k, v)
        check("moba topk>=blocks vs dense", out_f[0], dense, BF16_OUT_RTOL if dtype == jnp.bfloat16 else F32_RTOL,
              F32_ATOL)


# ----------------------------------------------------------------------------------------------- SSE
SSE_CASES = [
    # B, T, N, H, P, nw, nr, layout, init
    (1, 1, 1, 32, 4, 2, 2, "single", False),
    (2, 75, 2, 32, 4, 2, 2, "varlen", True),
    (2, 45, 1, 64, 3, 1, 1, "holes", True),
    (2, 40, 1, 32, 4, 1, 2, "leftpad", False),  # readers != writers: mask form only
]


def _sse_id(c, form):
    B, T, N, H, P, nw, nr, layout, init = c
    return shape_id(f"w{nw}r{nr}", layout, "s0" if init else "", f"{form}_form", B=B, T=T, N=N, H=H, P=P)


SSE_GRID = [(c, form) for c in SSE_CASES for form in ("varlen", "mask") if form == "mask" or c[5] == c[6]]


@pytest.mark.parametrize("case,form,dtype", grid(SSE_GRID, [_sse_id(c, f) for c, f in SSE_GRID],
                                                  lambda c, f: c[7] in BF16_LAYOUTS))
@pytest.mark.parametrize("kind", ["gdn", "gla"])
def test_sse(kind, case, form, dtype):
    B, T, N, H, P, nw, nr, layout, init = case
    q1, k1, q2, k2, v, gate, beta, p, write, read, s0 = sse_inputs(
        rng_for("fast-sse", kind, case), kind, B, T, N, H, P, nw, nr, init, strong=layout == "holes")
    seg = jnp.asarray(make_segment_ids(B, T, layout))
    inputs = dict(q1=q1, k1=k1, q2=q2, k2=k2, v=v, gate=gate, p=p)
    if kind == "gdn":
        inputs["beta"] = beta
    if init:
        inputs["s0"] = s0
    wr, rd = jnp.asarray(write), jnp.asarray(read)

    def run(impl):
        def f(x):
            common = dict(form=form, segment_ids=seg, initial_state=x.get("s0"), kernels=Kernels.resolve(impl))
            if kind == "gdn":
                return sse_gdn(x["q1"], x["k1"], x["q2"], x["k2"], x["v"], x["gate"], x["beta"], x["p"], wr, rd,
                               **common)
            return sse_gla(x["q1"], x["k1"], x["q2"], x["k2"], x["v"], x["gate"], x["p"], wr, rd, **common)
        return f

    out_f, _ = compare(f"sse_{kind}_{form}", run("xla"), run("reference"), inputs, dtype,
                       x64_grads=("p",) if kind == "gdn" else ())
    assert np.all(np.asarray(out_f[0], np.float32)[np.asarray(seg) == 0] == 0)


# ----------------------------------------------------------------------------------------------- dtypes
@pytest.mark.parametrize("op", ["gdn", "gla", "gdn_reference", "gla_reference"])
def test_output_dtype(op):
    """Outputs are in ``v.dtype`` (the documented contract), final states float32."""
    B, T, N, H = 1, 20, 1, 32
    rng = rng_for("dtype", op)
    q, k, v = (jnp.asarray(randn(rng, B, T, N, H), jnp.bfloat16) for _ in range(3))
    g = jnp.full((B, T, N), -0.1, jnp.bfloat16)
    fn = {"gdn": lambda: chunk_gated_delta_rule(q, k, v, g, g * -5, chunk_size=16),
          "gdn_reference": lambda: gated_delta_rule_reference(q, k, v, g, g * -5),
          "gla": lambda: chunk_gla(q, k, v, jnp.broadcast_to(g[..., None], q.shape), chunk_size=16),
          "gla_reference": lambda: gla_reference(q, k, v, jnp.broadcast_to(g[..., None], q.shape))}[op]
    o, S = fn()
    assert S.dtype == jnp.float32
    assert o.dtype == jnp.bfloat16, o.dtype
