"""Fast ("xla") token-mixing paths against the per-token / dense references (and the float64 oracles).

Every case checks the forward outputs AND gradients: ``jax.grad`` of ``sum_i <w_i, out_i>`` (random weights
``w_i``; for recurrences ``out`` includes the final state) with respect to every floating input.

Bounds (``max|fast - ref| <= rtol * max|ref| + atol``):
- float32: rtol = 1e-4 (the brief's bound). Both sides are float32 computations of the same function in a
  different order (chunked / tiled vs token scan / dense): their difference is float32 rounding noise, observed
  ~1e-6 relative, so 1e-4 leaves ample headroom. atol = 1e-6 only covers tensors whose max|ref| is itself ~0
  (e.g. gradients that are exactly zero on both sides up to rounding noise of O(1e-7) absolute).
- bfloat16: the inputs are cast to bf16, the fast path runs on them, and the reference runs in float32 on the
  SAME bf16-rounded inputs (upcast exactly), so the input rounding cancels. The fast paths accumulate in float32
  and round the output to bf16 once: that rounding is <= 1/2 ulp = 2^-9 relative of each entry (bf16 has an 8-bit
  significand: ulp = 2^-8 relative at most), i.e. <= 2^-9 * max|ref| plus the float32 noise above. We allow
  2 ulp = 2 * 2^-8 * max|ref| for outputs (4x the single rounding: the float32 reordering noise and a value sitting
  at a binade edge). Gradients w.r.t. bf16 inputs are also rounded to bf16 at the cast; an input used along
  several paths (q, k of the recurrences enter the l2-norm, the state update and the output; SSE v enters both
  branches) may be rounded once per path before the bf16 sum, so gradients get 4 ulp = 4 * 2^-8 * max|ref|.
  Final states are float32 (never rounded to bf16) and are held to the same bound as the outputs.
- Ill-conditioned gradients, checked in float64 instead (``x64_grads``): in SSE-GDN the router probability p
  only scales q2 and k2, which are L2-normalised inside the recurrence, so the output depends on p only through
  the norm's eps: ``d/dp [p x / sqrt(p^2 |x|^2 + eps)] = eps x / (p^2 |x|^2 + eps)^1.5`` is computed (by any
  autodiff) as the difference of two terms ``~ (p^2 |x|^2 / eps)`` times larger than itself (up to 1e7 here), so
  each float32 evaluation carries a relative error ~ 6e-8 * 1e7 on it and two correct float32 paths disagree by
  O(1) relative. Both paths are then run on the same (rounded) values in float64, where the same amplification
  leaves ~1e-9, and compared with X64_RTOL = 1e-6.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spb2_jax import ops
from spb2_jax.ops.attention import attention_reference
from spb2_jax.ops.gdn_chunked import chunk_gated_delta_rule
from spb2_jax.ops.gla_chunked import chunk_gla
from spb2_jax.ops.moba import moba_attention_reference
from spb2_jax.ops.moba_blockwise import causal_attention, moba_attention
from spb2_jax.ops.recurrent import gated_delta_rule_reference, gla_reference
from spb2_jax.ops.swa_blockwise import sliding_window_attention
from spb2_jax.ops.sse import sse_gdn, sse_gla
from spb2_jax.options import Kernels
from tests import oracles
from tests.test_ops_reference import gdn_inputs, make_segment_ids, randn, rng_for, sse_inputs
from tests.test_ops_reference import log_sigmoid, silu, softmax_np

F32_RTOL, F32_ATOL = 1e-4, 1e-6
BF16_ULP = 2.0 ** -8
BF16_OUT_RTOL = 2 * BF16_ULP
BF16_GRAD_RTOL = 4 * BF16_ULP
X64_RTOL = 1e-6
TOL_ORACLE = 1e-5  # float32 recurrence vs float64 oracle (see tests/test_ops_reference.py, TOL_REC)

MAX_ERR: dict[str, float] = {}  # op/dtype/kind -> worst err / max|ref| seen (printed with -s at the end)


@pytest.fixture(autouse=True, scope="module")
def _fast_compiles():
    """Compile time dominates; skip most XLA optimisation passes (restored afterwards)."""
    old = jax.config.values["jax_disable_most_optimizations"]
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", old)
    for key in sorted(MAX_ERR):
        print(f"MAXERR {key}: {MAX_ERR[key]:.3e}")


# ----------------------------------------------------------------------------------------------- helpers
def seg_ids(B, T, layout):
    """``make_segment_ids`` layouts plus "short": many short segments (lengths 1, 2, 3, 1, 4, ...), a hole."""
    if layout != "short":
        return make_segment_ids(B, T, layout)
    seg = np.zeros((B, T), np.int32)
    for b in range(B):
        t, i, lens = b, 1, [1, 2, 3, 1, 4, 2, 1, 5]  # row b starts with b padding tokens
        while t < T:
            n = lens[i % len(lens)]
            seg[b, t:t + n] = i
            t += n
            i += 1
        if T > 10:
            seg[b, 7] = 0  # a padding hole
    return seg


def bound(ref, rtol, atol):
    return rtol * float(np.max(np.abs(ref), initial=0.0)) + atol


def check(name, key, actual, expected, rtol, atol):
    a = np.asarray(jnp.asarray(actual, jnp.float32), np.float64)
    e = np.asarray(expected, np.float64)
    assert a.shape == e.shape, (name, a.shape, e.shape)
    assert np.all(np.isfinite(a)), f"{name}: non-finite values"
    err = float(np.max(np.abs(a - e), initial=0.0))
    scale = max(float(np.max(np.abs(e), initial=0.0)), 1e-30)
    MAX_ERR[key] = max(MAX_ERR.get(key, 0.0), err / scale)
    assert err <= bound(e, rtol, atol), f"{name}: max|err| = {err:.3e} (rel {err / scale:.3e}) > " \
                                        f"{rtol:.1e} * {scale:.3e} + {atol:.0e}"


def compare(op, fast, ref, inputs, dtype, n_out, x64_grads=(), cancellation=None):
    """Forward + gradient of ``fast`` (on ``inputs`` cast to ``dtype``) against ``ref`` (float32, same values).

    ``fast`` / ``ref``: ``dict -> tuple of n_out arrays``. ``inputs``: dict of float32 numpy arrays; keys whose
    name starts with ``s0`` (recurrent states) stay float32. ``x64_grads``: inputs whose gradient is
    ill-conditioned (module docstring); it is compared in float64 instead. ``cancellation``: optional
    ``cotangents (float64 numpy) -> {input: extra absolute allowance}`` for a gradient that is exactly 0 by
    cancellation, with the allowance derived by the caller. Returns the fast and reference outputs."""
    cast = {k: jnp.asarray(v, jnp.float32 if k.startswith("s0") else dtype) for k, v in inputs.items()}
    ref_in = {k: jnp.asarray(v, jnp.float32) for k, v in cast.items()}  # exact upcast of the rounded values
    rng = rng_for("weights", op, tuple(sorted(inputs)))
    out_f = jax.jit(fast)(cast)
    out_r = jax.jit(ref)(ref_in)
    # bf16-representable weights: the cotangent of a bf16 output is then exact on both sides
    ws = [jnp.asarray(jnp.asarray(randn(rng, *o.shape), jnp.bfloat16), jnp.float32) for o in out_r]

    def loss(fn, xs):
        return sum(jnp.sum(w * o.astype(jnp.float32)) for w, o in zip(ws, fn(xs)))

    g_f = jax.jit(jax.grad(functools.partial(loss, fast)))(cast)
    g_r = jax.jit(jax.grad(functools.partial(loss, ref)))(ref_in)
    bf = dtype == jnp.bfloat16
    tag = "bf16" if bf else "f32"
    for i, (a, e) in enumerate(zip(out_f, out_r)):
        what = "out" if i == 0 else "state"
        if i > 0:
            assert a.dtype == jnp.float32, (what, a.dtype)  # output dtype: see test_output_dtype
        check(f"{op} {tag} {what}", f"{op}/{tag}/fwd", a, e, BF16_OUT_RTOL if bf else F32_RTOL, F32_ATOL)
    extra = cancellation([np.asarray(w, np.float64) for w in ws]) if cancellation else {}
    for k in inputs:
        assert g_f[k].dtype == cast[k].dtype, (k, g_f[k].dtype)
        if k in x64_grads:
            continue
        check(f"{op} {tag} grad[{k}]", f"{op}/{tag}/grad", g_f[k], g_r[k], BF16_GRAD_RTOL if bf else F32_RTOL,
              F32_ATOL + extra.get(k, 0.0))
    if x64_grads:
        with jax.enable_x64(True):
            in64 = {k: jnp.asarray(v, jnp.float64) for k, v in ref_in.items()}
            ws64 = [jnp.asarray(w, jnp.float64) for w in ws]

            def loss64(fn, xs):
                return sum(jnp.sum(w * o) for w, o in zip(ws64, fn(xs)))

            g_f64 = jax.jit(jax.grad(functools.partial(loss64, fast)))(in64)
            g_r64 = jax.jit(jax.grad(functools.partial(loss64, ref)))(in64)
            for k in x64_grads:
                assert g_f64[k].dtype == jnp.float64
                check(f"{op} x64 grad[{k}]", f"{op}/x64/grad", g_f64[k], g_r64[k], X64_RTOL, 0.0)
    return out_f, out_r


DTYPES = [pytest.param(jnp.float32, id="f32"), pytest.param(jnp.bfloat16, id="bf16", marks=pytest.mark.slow)]
BF16_LAYOUTS = ("varlen", "holes")  # bf16 runs on these layouts only (f32 covers every layout)


def grid(cases, ids, bf16_ok):
    """``pytest.param(*case, dtype)`` for every case x dtype, bf16 only where ``bf16_ok(case)``: the grid is
    pruned at collection instead of skipping tests at run time."""
    out = []
    for case, case_id in zip(cases, ids):
        values = case if isinstance(case, tuple) and len(case) and isinstance(case[0], tuple) else (case,)
        for dt in DTYPES:
            (dtype,) = dt.values
            if dtype == jnp.bfloat16 and not bf16_ok(*values):
                continue
            out.append(pytest.param(*values, dtype, id=f"{case_id}-{dt.id}", marks=dt.marks))
    return out


# ----------------------------------------------------------------------------------------------- gated delta rule
GDN_CASES = [
    # B, T, H, K, V, C, layout, g_scale, init
    (1, 1, 2, 64, 64, 16, "single", 1.0, False),
    (2, 75, 2, 64, 64, 16, "varlen", 1.0, True),
    (2, 45, 2, 64, 32, 16, "holes", 1.0, True),
    (2, 37, 1, 64, 64, 16, "leftpad", 8.0, True),
    (2, 40, 2, 32, 32, 16, "rightpad", 0.1, False),
    (2, 30, 1, 32, 32, 8, "short", 1.0, True),
    (1, 24, 1, 128, 128, 16, "varlen", 1.0, True),
]


def _rec_id(c):
    B, T, H, K, V, C, layout, g, init = c
    return f"B{B}-T{T}-H{H}-K{K}-V{V}-C{C}-{layout}-g{g}" + ("-s0" if init else "")


@pytest.mark.parametrize("case,dtype", grid(GDN_CASES, map(_rec_id, GDN_CASES), lambda c: c[6] in BF16_LAYOUTS))
def test_chunk_gated_delta_rule(case, dtype):
    B, T, H, K, V, C, layout, g_scale, init = case
    q, k, v, g, beta, s0 = gdn_inputs(rng_for("fast-gdn", case), B, T, H, K, V, g_scale, init)
    assert beta.max() > 1.0  # negative eigenvalues are exercised
    seg = jnp.asarray(seg_ids(B, T, layout))
    inputs = dict(q=q, k=k, v=v, g=g, beta=beta)
    if init:
        inputs["s0"] = s0

    def run(fn, **kw):
        return lambda x: fn(x["q"], x["k"], x["v"], x["g"], x["beta"], initial_state=x.get("s0"),
                            segment_ids=seg, **kw)

    out_f, out_r = compare("gdn", run(chunk_gated_delta_rule, chunk_size=C), run(gated_delta_rule_reference),
                           inputs, dtype, 2)
    assert np.all(np.asarray(out_f[0], np.float32)[np.asarray(seg) == 0] == 0)
    if dtype == jnp.float32:
        o_ref, S_ref = oracles.gated_delta_rule(q, k, v, g, beta, initial_state=s0, segment_ids=np.asarray(seg))
        check("gdn vs oracle out", "gdn/f32/oracle", out_f[0], o_ref, TOL_ORACLE, 0.0)
        check("gdn vs oracle state", "gdn/f32/oracle", out_f[1], S_ref, TOL_ORACLE, 0.0)


# ----------------------------------------------------------------------------------------------- GLA
def gla_inputs_fast(rng, B, T, H, K, V, decay, init):
    q = silu(randn(rng, B, T, H, K)).astype(np.float32)
    k = softmax_np(randn(rng, B, T, H, K)).astype(np.float32)
    v = randn(rng, B, T, H, V)
    x = rng.standard_normal((B, T, H, K))
    gk = log_sigmoid(x) / 16
    if decay == "strong":  # a third of the entries in [-20, 0], including exactly -20
        u = rng.random((B, T, H, K))
        gk = np.where(u < 1 / 3, -60.0 * u, gk)
        gk.reshape(-1)[0] = -20.0
    s0 = randn(rng, B, H, K, V, scale=0.5) if init else None
    return q, k, v, gk.astype(np.float32), s0


GLA_CASES = [
    # B, T, H, K, V, C, layout, decay, init
    (1, 1, 2, 64, 64, 16, "single", "weak", False),
    (2, 75, 2, 64, 64, 16, "varlen", "weak", True),
    (2, 75, 2, 64, 64, 16, "varlen", "strong", True),
    (2, 45, 2, 32, 64, 16, "holes", "strong", True),
    (2, 37, 1, 64, 64, 16, "leftpad", "weak", True),
    (2, 40, 2, 32, 32, 16, "rightpad", "strong", False),
    (2, 30, 1, 32, 32, 8, "short", "weak", True),
    (1, 24, 1, 128, 128, 16, "varlen", "strong", True),
]


@pytest.mark.parametrize("case,dtype", grid(GLA_CASES, map(_rec_id, GLA_CASES), lambda c: c[6] in BF16_LAYOUTS))
def test_chunk_gla(case, dtype):
    B, T, H, K, V, C, layout, decay, init = case
    q, k, v, gk, s0 = gla_inputs_fast(rng_for("fast-gla", case), B, T, H, K, V, decay, init)
    seg = jnp.asarray(seg_ids(B, T, layout))
    inputs = dict(q=q, k=k, v=v, gk=gk)
    if init:
        inputs["s0"] = s0

    def run(fn, **kw):
        return lambda x: fn(x["q"], x["k"], x["v"], x["gk"], initial_state=x.get("s0"), segment_ids=seg, **kw)

    out_f, _ = compare("gla", run(chunk_gla, chunk_size=C), run(gla_reference), inputs, dtype, 2)
    assert np.all(np.asarray(out_f[0], np.float32)[np.asarray(seg) == 0] == 0)
    if dtype == jnp.float32:
        o_ref, S_ref = oracles.gla(q, k, v, gk, initial_state=s0, segment_ids=np.asarray(seg))
        check("gla vs oracle out", "gla/f32/oracle", out_f[0], o_ref, TOL_ORACLE, 0.0)
        check("gla vs oracle state", "gla/f32/oracle", out_f[1], S_ref, TOL_ORACLE, 0.0)


# ----------------------------------------------------------------------------------------------- attention
ATTN_CASES = [
    # B, T, N, KV, D, layout
    (1, 1, 2, 1, 64, "single"),
    (2, 75, 4, 1, 64, "varlen"),
    (2, 75, 4, 2, 64, "holes"),
    (2, 40, 2, 2, 64, "leftpad"),
    (2, 40, 2, 1, 64, "rightpad"),
    (2, 30, 2, 2, 32, "short"),
    (1, 24, 2, 1, 128, "varlen"),
]


def _attn_id(c, extra=""):
    B, T, N, KV, D, layout = c
    return f"B{B}-T{T}-H{N}-KV{KV}-D{D}{extra}-{layout}"


def attn_inputs(key, B, T, N, KV, D):
    rng = rng_for("fast-attn", key)
    return dict(q=randn(rng, B, T, N, D, scale=1.5), k=randn(rng, B, T, KV, D, scale=1.5), v=randn(rng, B, T, KV, D))


SWA_CASES = [(c, w) for c in ATTN_CASES for w in ((5, 40) if c[5] == "varlen" and c[1] >= 40 else (5 if c[1] >= 40 else 3,))]


@pytest.mark.parametrize("case,window,dtype", grid([(c, w) for c, w in SWA_CASES],
                                                   [_attn_id(c, f"-W{w}-BS16") for c, w in SWA_CASES],
                                                   lambda c, w: c[5] in BF16_LAYOUTS))
def test_sliding_window_attention(case, window, dtype):
    B, T, N, KV, D, layout = case
    seg = jnp.asarray(seg_ids(B, T, layout))
    x = attn_inputs((case, window), B, T, N, KV, D)
    fast = lambda a: (sliding_window_attention(a["q"], a["k"], a["v"], window=window, segment_ids=seg,  # noqa
                                               block_size=16),)
    ref = lambda a: (attention_reference(a["q"], a["k"], a["v"], segment_ids=seg, causal=True, window=window),)  # noqa
    out_f, _ = compare("swa", fast, ref, x, dtype, 1)
    assert np.all(np.asarray(out_f[0], np.float32)[np.asarray(seg) == 0] == 0)


@pytest.mark.parametrize("case,dtype", grid(ATTN_CASES, [_attn_id(c, "-BS16") for c in ATTN_CASES],
                                             lambda c: c[5] in BF16_LAYOUTS))
def test_causal_attention(case, dtype):
    B, T, N, KV, D, layout = case
    seg = jnp.asarray(seg_ids(B, T, layout))
    x = attn_inputs(case, B, T, N, KV, D)
    fast = lambda a: (causal_attention(a["q"], a["k"], a["v"], segment_ids=seg, block_size=16),)  # noqa
    ref = lambda a: (attention_reference(a["q"], a["k"], a["v"], segment_ids=seg, causal=True),)  # noqa
    out_f, _ = compare("causal", fast, ref, x, dtype, 1)
    assert np.all(np.asarray(out_f[0], np.float32)[np.asarray(seg) == 0] == 0)


MOBA_CASES = [(c, C, topk) for i, c in enumerate(ATTN_CASES)
              for C, topk in (((16, 2), (8, 3), (16, 8)) if c[5] == "varlen" and c[1] >= 40 else
                              (((16, 2), (8, 3), (16, 8))[i % 3],))]


@pytest.mark.parametrize("case,C,topk,dtype", grid(MOBA_CASES, [_attn_id(c, f"-C{C}-k{k}-BS16") for c, C, k in MOBA_CASES],
                                                  lambda c, C, k: c[5] in BF16_LAYOUTS and C != 8))
def test_moba_attention(case, C, topk, dtype):
    B, T, N, KV, D, layout = case
    seg = jnp.asarray(seg_ids(B, T, layout))
    x = attn_inputs((case, C, topk), B, T, N, KV, D)
    fast = lambda a: (moba_attention(a["q"], a["k"], a["v"], chunk_size=C, topk=topk, segment_ids=seg,  # noqa
                                     block_size=16),)
    ref = lambda a: (moba_attention_reference(a["q"], a["k"], a["v"], chunk_size=C, topk=topk,  # noqa
                                              segment_ids=seg),)
    out_f, out_r = compare("moba", fast, ref, x, dtype, 1)
    assert np.all(np.asarray(out_f[0], np.float32)[np.asarray(seg) == 0] == 0)
    if topk * C >= T:  # topk >= number of blocks: MoBA is dense causal attention
        q, k, v = (jnp.asarray(jnp.asarray(x[n], dtype), jnp.float32) for n in "qkv")
        dense = jax.jit(lambda q, k, v: attention_reference(q, k, v, segment_ids=seg, causal=True))(q, k, v)
        check("moba topk>=blocks vs dense", f"moba/{'bf16' if dtype == jnp.bfloat16 else 'f32'}/dense",
              out_f[0], dense, BF16_OUT_RTOL if dtype == jnp.bfloat16 else F32_RTOL, F32_ATOL)


# ----------------------------------------------------------------------------------------------- SSE
SSE_CASES = [
    # B, T, H, K, N, nw, nr, layout, init
    (1, 1, 1, 32, 4, 2, 2, "single", False),
    (2, 75, 2, 32, 4, 2, 2, "varlen", True),
    (2, 45, 1, 64, 3, 1, 1, "holes", True),
    (2, 40, 1, 32, 4, 1, 2, "leftpad", False),  # readers != writers: mask form only
]


def _sse_id(c):
    B, T, H, K, N, nw, nr, layout, init = c
    return f"B{B}-T{T}-H{H}-K{K}-N{N}-w{nw}r{nr}-{layout}" + ("-s0" if init else "")


SSE_GRID = [(c, form) for c in SSE_CASES for form in ("varlen", "mask") if form == "mask" or c[5] == c[6]]


@pytest.mark.parametrize("case,form,dtype", grid(SSE_GRID, [f"{_sse_id(c)}-{f}" for c, f in SSE_GRID],
                                                  lambda c, f: c[7] in BF16_LAYOUTS))
@pytest.mark.parametrize("kind", ["gdn", "gla"])
def test_sse(kind, case, form, dtype):
    B, T, H, K, N, nw, nr, layout, init = case
    q1, k1, q2, k2, v, gate, beta, p, write, read, s0 = sse_inputs(
        rng_for("fast-sse", kind, case), kind, B, T, H, K, N, nw, nr, init, strong=layout == "holes")
    seg = jnp.asarray(seg_ids(B, T, layout))
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

    out_f, _ = compare(f"sse_{kind}_{form}", run("xla"), run("reference"), inputs, dtype, 2,
                       x64_grads=("p",) if kind == "gdn" else ())
    assert np.all(np.asarray(out_f[0], np.float32)[np.asarray(seg) == 0] == 0)


# ----------------------------------------------------------------------------------------------- dtypes
@pytest.mark.parametrize("op", ["gdn", "gla", "gdn_reference", "gla_reference"])
def test_output_dtype(op):
    """Outputs are in ``v.dtype`` (the documented contract), final states float32."""
    B, T, H, K = 1, 20, 1, 32
    rng = rng_for("dtype", op)
    q, k, v = (jnp.asarray(randn(rng, B, T, H, K), jnp.bfloat16) for _ in range(3))
    g = jnp.full((B, T, H), -0.1, jnp.bfloat16)
    fn = {"gdn": lambda: chunk_gated_delta_rule(q, k, v, g, g * -5, chunk_size=16),
          "gdn_reference": lambda: gated_delta_rule_reference(q, k, v, g, g * -5),
          "gla": lambda: chunk_gla(q, k, v, jnp.broadcast_to(g[..., None], q.shape), chunk_size=16),
          "gla_reference": lambda: gla_reference(q, k, v, jnp.broadcast_to(g[..., None], q.shape))}[op]
    o, S = fn()
    assert S.dtype == jnp.float32
    assert o.dtype == jnp.bfloat16, o.dtype
