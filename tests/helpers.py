"""The test suite's shared cases and helpers: the one module test modules import from (with ``tests/oracles.py``,
the float64 NumPy oracles); no ``tests/test_*.py`` imports another (``test_suite_hygiene`` checks it).

Parametrize ids (``shape_id``): sizes as a letter and a number joined by ``-``, then words. The letters are the
package's shape vocabulary (``spb2_jax.parallel.rules``): B batch, T time, S key time / cache slots, D model width,
N query heads (the heads of a recurrence), K kv heads, H head dim (queries and keys), E value head dim of a
recurrence, P SSE partitions, C chunk (MoBA block, recurrence chunk); and W sliding window, ``top`` MoBA top-k,
``tile`` attention tile, ``w2r2`` SSE writers / readers. The words: the segment layout (``make_segment_ids``),
then options (``s0``: an initial state; ``f32`` / ``bf16``; a Pallas target). E.g.
``B2-T75-N4-K2-H64-W16-varlen`` (attention), ``B2-T75-N2-H64-E32-C16-varlen-s0-f32`` (a chunked recurrence).
"""

from __future__ import annotations

import functools
import os
import socket
import zlib
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spb2_jax import ops
from tests import oracles

# ----------------------------------------------------------------------------------------------- fixtures
REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SPB2_SHARED", REPO.parent / "shared"))
OFFICIAL = SHARED / "fixtures" / "official"
FIXTURES = ("tiny", "tiny-mask", "tiny-gla", "tiny-gla-mask", "tiny-var", "tiny-leftpad")


def free_port() -> int:
    """A free localhost TCP port (for a ``jax.distributed`` coordinator)."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


QWEN3_TINY = SHARED / "fixtures" / "qwen3" / "tiny"


def qwen3_fixture_dir() -> Path:
    """The HF Qwen3 golden fixture; fails loudly (never skips) when ../shared is absent."""
    if not (QWEN3_TINY / "outputs.npz").is_file():
        raise FileNotFoundError(f"Qwen3 fixture not found at {QWEN3_TINY}: the tests need ../shared beside the "
                                "repository (or SPB2_SHARED pointing at it)")
    return QWEN3_TINY


def fixture_dir(name: str) -> Path:
    """Directory of an official fixture; fails loudly (never skips) when ../shared is absent."""
    path = OFFICIAL / name
    if not (path / "outputs.npz").is_file():
        raise FileNotFoundError(f"official fixture {name!r} not found at {path}: the tests need ../shared beside "
                                "the repository (or SPB2_SHARED pointing at it)")
    return path


# ----------------------------------------------------------------------------------------------- ids
def shape_id(*words, **sizes) -> str:
    """``shape_id("varlen", B=2, T=75, H=4)`` -> ``"B2-T75-H4-varlen"``: sizes in keyword order (None left out),
    then the words (empty ones left out)."""
    return "-".join([f"{k}{v}" for k, v in sizes.items() if v is not None] + [w for w in words if w])


def params(cases, ids, default):
    """``pytest.param(*case, id=...)`` per case (a tuple of argument values), marked slow unless
    ``default(*case)``."""
    return [pytest.param(*c, id=i, marks=() if default(*c) else pytest.mark.slow) for c, i in zip(cases, ids)]


# ----------------------------------------------------------------------------------------------- inputs
def rng_for(*key) -> np.random.Generator:
    """A generator seeded by ``key`` (a test's name and case): every case draws its own reproducible inputs."""
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


def randn(rng, *shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


silu, softmax_np = oracles.silu, oracles.softmax


def log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


def make_segment_ids(B: int, T: int, layout: str) -> np.ndarray:
    """``[B, T]`` int32 segment ids (0 = padding).

    single: one segment per row. leftpad / rightpad: padding then one segment / one segment then padding
    (row 1 of leftpad is fully real). varlen: even rows = left padding + 3 segments incl. a length-1 one;
    odd rows = a length-1 segment first, 2 more segments, right padding (ids 5, 7, 9 are not consecutive).
    holes: ids reused; a padding hole or another id in between starts a new segment. short: many short segments
    (lengths 1, 2, 3, 1, 4, ...), row b starting with b padding tokens, and a padding hole at t = 7.
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
        elif layout == "holes":
            third = max(1, T // 3)
            if b % 2 == 0:
                seg[b] = 1
                seg[b, third:third + 2] = 0
            else:
                seg[b] = 2
                seg[b, third:2 * third] = 3
        elif layout == "short":
            t, i, lens = b, 1, [1, 2, 3, 1, 4, 2, 1, 5]
            while t < T:
                n = lens[i % len(lens)]
                seg[b, t:t + n] = i
                t += n
                i += 1
            if T > 10:
                seg[b, 7] = 0
        else:
            raise ValueError(layout)
    return seg


def attn_inputs(rng, B, T, N, K, H, scale=1.0):
    """q ``[B, T, N, H]``, k, v ``[B, T, K, H]`` (float32 numpy; q and k times ``scale``) as a dict."""
    return dict(q=randn(rng, B, T, N, H, scale=scale), k=randn(rng, B, T, K, H, scale=scale),
                v=randn(rng, B, T, K, H))


def gdn_inputs(rng, B, T, N, H, E, g_scale, init):
    """q, k ``[B, T, N, H]``, v ``[B, T, N, E]``, g = -g_scale softplus(.) <= 0 and beta in (0, 2) (negative
    eigenvalues) ``[B, T, N]``, s0 ``[B, N, H, E]`` or None."""
    q, k, v = randn(rng, B, T, N, H), randn(rng, B, T, N, H), randn(rng, B, T, N, E)
    g = (-g_scale * np.log1p(np.exp(rng.standard_normal((B, T, N))))).astype(np.float32)
    beta = (2 / (1 + np.exp(-2 * rng.standard_normal((B, T, N))))).astype(np.float32)
    s0 = randn(rng, B, N, H, E, scale=0.5) if init else None
    return q, k, v, g, beta, s0


def gla_inputs(rng, B, T, N, H, E, decay, init):
    """q = silu(.), k = softmax(.) ``[B, T, N, H]`` (as the model feeds them), v ``[B, T, N, E]``, log-decays gk
    ``[B, T, N, H]``, s0 ``[B, N, H, E]`` or None. decay: "weak" (log_sigmoid / 16, mean ~ -0.05), "strong"
    (log_sigmoid(x - 2), mean ~ -2.3) or "extreme" (weak, with a third of the entries in [-20, 0] including exactly
    -20)."""
    q = silu(randn(rng, B, T, N, H)).astype(np.float32)
    k = softmax_np(randn(rng, B, T, N, H)).astype(np.float32)
    v = randn(rng, B, T, N, E)
    x = rng.standard_normal((B, T, N, H))
    gk = log_sigmoid(x - 2.0) if decay == "strong" else log_sigmoid(x) / 16
    if decay == "extreme":
        u = rng.random((B, T, N, H))
        gk = np.where(u < 1 / 3, -60.0 * u, gk)
        gk.reshape(-1)[0] = -20.0
    s0 = randn(rng, B, N, H, E, scale=0.5) if init else None
    return q, k, v, gk.astype(np.float32), s0


def sse_inputs(rng, kind, B, T, N, H, P, nw, nr, init, strong=False):
    """q1, k1, q2, k2, v ``[B, T, N, H]``, gate, beta, p, write, read ``[B, T, P]``, s0 ``[B, 1 + P, N, H, H]`` or
    None, as the model feeds them (feature maps applied); P partitions, nw writers, nr readers."""
    act = lambda x: silu(x).astype(np.float32)  # noqa: E731
    q1, q2 = act(randn(rng, B, T, N, H)), act(randn(rng, B, T, N, H))
    if kind == "gla":
        k1, k2 = softmax_np(randn(rng, B, T, N, H)), softmax_np(randn(rng, B, T, N, H))
        x = rng.standard_normal((B, T, 2, N, H))
        gate = (log_sigmoid(x - 2.0) if strong else log_sigmoid(x) / 16).astype(np.float32)
        beta = None
    else:
        k1, k2 = act(randn(rng, B, T, N, H)), act(randn(rng, B, T, N, H))
        gate = (-np.log1p(np.exp(rng.standard_normal((B, T, 2, N))))).astype(np.float32)
        beta = (2 / (1 + np.exp(-2 * rng.standard_normal((B, T, 2, N))))).astype(np.float32)
    v = act(randn(rng, B, T, N, H))
    p, write, read = (np.asarray(a) for a in ops.sse_route(jnp.asarray(randn(rng, B, T, P, scale=2.0)), nw, nr))
    s0 = randn(rng, B, 1 + P, N, H, H, scale=0.5) if init else None
    return (q1, k1.astype(np.float32), q2, k2.astype(np.float32), v, gate, beta, p, write, read, s0)


# ----------------------------------------------------------------------------------------------- references vs oracles
# Error metric of the reference ops against the float64 oracles: ``max|actual - expected| / max|expected|`` (a
# relative error scaled by the largest entry, so exact-zero padding outputs do not divide by zero). Inputs are
# float32 values; the oracle sees the same values in float64, so the error is the float32 arithmetic of the op
# alone (unit roundoff u = 2^-24 ~ 6e-8). Bounds from that arithmetic (every case measured stays below 7e-7, so
# the bounds below have >= 10x headroom):
# - norms: a handful of roundings per entry plus a <= 64-term sum -> TOL_ELEMENTWISE = 1e-6.
# - attention / MoBA: H <= 64 dot products give logit errors ~ sqrt(H) u |q||k| scale ~ 3e-7 absolute, which
#   the softmax passes on as a relative output error of the same size -> TOL_ATTN = 5e-6.
# - RoPE: angles pos * inv_freq are float32 (as in HF), absolute angle error <= pos u ~ 7e-6 for the positions
#   used (< 128) -> TOL_ROPE = 1e-5 (it grows with position: that is float32 RoPE, not a bug).
# - recurrences (T <= 100 steps, contractive decays and delta steps): rounding errors of the H-term state
#   updates add up like a random walk, ~ sqrt(T H) u ~ 5e-6 -> TOL_REC = 1e-5 (also the bound of the chunked
#   float32 recurrences against the oracles).
# Under ``jax.enable_x64(True)`` the ops run on float64 inputs in float64 and must match to TOL_X64 = 1e-12
# (observed ~1e-15); this pins details far below float32 noise (eps placement, scales, masks).
TOL_ELEMENTWISE = 1e-6
TOL_ATTN = 5e-6
TOL_ROPE = 1e-5
TOL_REC = 1e-5
TOL_X64 = 1e-12


def rel_err(actual, expected) -> float:
    a, e = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert a.shape == e.shape, (a.shape, e.shape)
    return float(np.max(np.abs(a - e), initial=0.0) / max(np.max(np.abs(e), initial=0.0), 1e-30))


def assert_close(actual, expected, tol, what=""):
    """``rel_err(actual, expected) <= tol``."""
    err = rel_err(actual, expected)
    assert err <= tol, f"{what}: max|err| / max|ref| = {err:.3e} > {tol:.1e}"


# ----------------------------------------------------------------------------------------------- fast vs reference
# Bounds of ``compare`` / ``check`` (``max|fast - ref| <= rtol * max|ref| + atol``):
#
# - float32: rtol = 1e-4 (the brief's bound). Both sides are float32 computations of the same function in a
#   different order (chunked / tiled vs token scan / dense): their difference is float32 rounding noise, observed
#   ~1e-6 relative, so 1e-4 leaves ample headroom. atol = 1e-6 only covers tensors whose max|ref| is itself ~0
#   (e.g. gradients that are exactly zero on both sides up to rounding noise of O(1e-7) absolute).
# - bfloat16: the inputs are cast to bf16, the fast path runs on them, and the reference runs in float32 on the
#   SAME bf16-rounded inputs (upcast exactly), so the input rounding cancels. The fast paths accumulate in float32
#   and round the output to bf16 once: that rounding is <= 1/2 ulp = 2^-9 relative of each entry (bf16 has an 8-bit
#   significand: ulp = 2^-8 relative at most), i.e. <= 2^-9 * max|ref| plus the float32 noise above. We allow
#   2 ulp = 2 * 2^-8 * max|ref| for outputs (4x the single rounding: the float32 reordering noise and a value sitting
#   at a binade edge). Gradients w.r.t. bf16 inputs are also rounded to bf16 at the cast; an input used along
#   several paths (q, k of the recurrences enter the l2-norm, the state update and the output; SSE v enters both
#   branches) may be rounded once per path before the bf16 sum, so gradients get 4 ulp = 4 * 2^-8 * max|ref|.
#   Final states are float32 (never rounded to bf16) and are held to the same bound as the outputs.
# - Ill-conditioned gradients, checked in float64 instead (``x64_grads``): in SSE-GDN the router probability p
#   only scales q2 and k2, which are L2-normalised inside the recurrence, so the output depends on p only through
#   the norm's eps: ``d/dp [p x / sqrt(p^2 |x|^2 + eps)] = eps x / (p^2 |x|^2 + eps)^1.5`` is computed (by any
#   autodiff) as the difference of two terms ``~ (p^2 |x|^2 / eps)`` times larger than itself (up to 1e7 here), so
#   each float32 evaluation carries a relative error ~ 6e-8 * 1e7 on it and two correct float32 paths disagree by
#   O(1) relative. Both paths are then run on the same (rounded) values in float64, where the same amplification
#   leaves ~1e-9, and compared with X64_RTOL = 1e-6.
F32_RTOL, F32_ATOL = 1e-4, 1e-6
BF16_ULP = 2.0 ** -8
BF16_U = 2.0 ** -9  # bf16 unit roundoff
BF16_OUT_RTOL = 2 * BF16_ULP
BF16_GRAD_RTOL = 4 * BF16_ULP
X64_RTOL = 1e-6


def check(name, actual, expected, rtol, atol):
    """``max|actual - expected| <= rtol * max|expected| + atol``, shapes equal and ``actual`` finite."""
    a = np.asarray(jnp.asarray(actual, jnp.float32), np.float64)
    e = np.asarray(expected, np.float64)
    assert a.shape == e.shape, (name, a.shape, e.shape)
    assert np.all(np.isfinite(a)), f"{name}: non-finite values"
    err = float(np.max(np.abs(a - e), initial=0.0))
    scale = max(float(np.max(np.abs(e), initial=0.0)), 1e-30)
    assert err <= rtol * float(np.max(np.abs(e), initial=0.0)) + atol, \
        f"{name}: max|err| = {err:.3e} (rel {err / scale:.3e}) > {rtol:.1e} * {scale:.3e} + {atol:.0e}"


def compare(op, fast, ref, inputs, dtype, x64_grads=(), cancellation=None):
    """Forward + gradient of ``fast`` (on ``inputs`` cast to ``dtype``) against ``ref`` (float32, same values).

    ``fast`` / ``ref``: ``dict -> tuple of arrays`` (the output, then float32 states). ``inputs``: dict of float32
    numpy arrays; keys whose name starts with ``s0`` (recurrent states) stay float32. The gradient is that of
    ``sum_i <w_i, out_i>`` (random bf16-representable weights ``w_i``) w.r.t. every input. ``x64_grads``: inputs
    whose gradient is ill-conditioned (the bounds above); it is compared in float64 instead. ``cancellation``:
    optional ``cotangents (float64 numpy) -> {input: extra absolute allowance}`` for a gradient that is exactly 0
    by cancellation, with the allowance derived by the caller. Returns the fast and reference outputs."""
    cast = {k: jnp.asarray(v, jnp.float32 if k.startswith("s0") else dtype) for k, v in inputs.items()}
    ref_in = {k: jnp.asarray(v, jnp.float32) for k, v in cast.items()}  # exact upcast of the rounded values
    rng = rng_for("weights", op, tuple(sorted(inputs)))
    # bf16-representable weights: the cotangent of a bf16 output is then exact on both sides
    ws = [jnp.asarray(jnp.asarray(randn(rng, *o.shape), jnp.bfloat16), jnp.float32)
          for o in jax.eval_shape(ref, ref_in)]

    def loss(fn, xs):
        outs = fn(xs)
        return sum(jnp.sum(w * o.astype(jnp.float32)) for w, o in zip(ws, outs)), outs

    # outputs and gradients from one program per side (one compile instead of two)
    (_, out_f), g_f = jax.jit(jax.value_and_grad(functools.partial(loss, fast), has_aux=True))(cast)
    (_, out_r), g_r = jax.jit(jax.value_and_grad(functools.partial(loss, ref), has_aux=True))(ref_in)
    bf = dtype == jnp.bfloat16
    tag = "bf16" if bf else "f32"
    for i, (a, e) in enumerate(zip(out_f, out_r)):
        what = "out" if i == 0 else "state"
        if i > 0:
            assert a.dtype == jnp.float32, (what, a.dtype)  # final states stay float32
        check(f"{op} {tag} {what}", a, e, BF16_OUT_RTOL if bf else F32_RTOL, F32_ATOL)
    extra = cancellation([np.asarray(w, np.float64) for w in ws]) if cancellation else {}
    for k in inputs:
        assert g_f[k].dtype == cast[k].dtype, (k, g_f[k].dtype)
        if k in x64_grads:
            continue
        check(f"{op} {tag} grad[{k}]", g_f[k], g_r[k], BF16_GRAD_RTOL if bf else F32_RTOL,
              F32_ATOL + extra.get(k, 0.0))
    if x64_grads:
        with jax.enable_x64(True):
            in64 = {k: jnp.asarray(v, jnp.float64) for k, v in ref_in.items()}
            ws64 = [jnp.asarray(w, jnp.float64) for w in ws]

            def loss64(fn, wrt, rest):  # differentiated w.r.t. the x64_grads inputs only
                return sum(jnp.sum(w * o) for w, o in zip(ws64, fn(wrt | rest)))

            wrt = {k: in64[k] for k in x64_grads}
            rest = {k: v for k, v in in64.items() if k not in wrt}
            g_f64 = jax.jit(jax.grad(functools.partial(loss64, fast)))(wrt, rest)
            g_r64 = jax.jit(jax.grad(functools.partial(loss64, ref)))(wrt, rest)
            for k in x64_grads:
                assert g_f64[k].dtype == jnp.float64
                check(f"{op} x64 grad[{k}]", g_f64[k], g_r64[k], X64_RTOL, 0.0)
    return out_f, out_r


# ----------------------------------------------------------------------------------------------- Pallas kernels
def kernel_case_id(case, **extra) -> str:
    """Id of a Pallas attention case ``(B, T, N, K, H, tile, layout)`` with extra sizes (W, C, top) before the
    tile."""
    B, T, N, K, H, tile, layout = case
    return shape_id(layout, B=B, T=T, N=N, K=K, H=H, **extra, tile=tile)


def kernel_inputs(case):
    """``(dict of q, k, v, segment ids)`` of a Pallas attention case ``(B, T, N, K, H, tile, layout)``."""
    B, T, N, K, H, tile, layout = case
    return attn_inputs(rng_for("pallas-attn", case), B, T, N, K, H), jnp.asarray(make_segment_ids(B, T, layout))


def attention_ops(name, seg, tile, target, **kw):
    """``(pallas, xla)`` callables ``dict -> (o,)`` of one ``spb2_jax.ops`` attention entry point (``"swa"``,
    ``"moba"``, ``"causal"``); the Pallas one runs the ``target`` kernels in interpret mode."""
    op = dict(swa=ops.sliding_window_attention, moba=ops.moba_attention, causal=ops.causal_attention)[name]

    def run(impl, x, **pallas):
        return (op(x["q"], x["k"], x["v"], segment_ids=seg, block_size=tile, impl=impl, **pallas, **kw),)

    return functools.partial(run, "pallas", interpret=True, target=target), functools.partial(run, "xla")


def awkward_moba_selection(case, C, R):
    """A selection as a caller might hand it in: random block indices from -1 up to past the own block, with
    repeats — the own block, later blocks and repeats must add nothing (the dense mask's meaning)."""
    B, T, N = case[:3]
    rng = rng_for("awkward-sel", case, C, R)
    seg = jnp.asarray(make_segment_ids(B, T, case[6]))
    own = np.asarray(ops.segment_positions(seg)) // C
    sel = rng.integers(-1, own.max() + 2, size=(B, T, N, R))
    sel[..., -1] = sel[..., 0]  # a repeat in every row
    sel[:, ::3, :, 0] = own[:, ::3, None]  # the own block
    return jnp.asarray(sel, jnp.int32), seg
