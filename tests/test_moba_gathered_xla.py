"""MoBA in gathered form on the XLA path (``spb2_jax.ops.moba_gathered``, the default of ``moba_attention`` with
``impl="xla"``) against the dense-mask twin and the float64 oracle.

float32 bound: ``helpers.compare`` (forward and the gradient of every input, 1e-4 * max|ref| + 1e-6): both sides
are float32 evaluations of the same softmax in a different order (two parts merged by log-sum-exp vs one masked
row). float64: TOL_X64 against the NumPy oracle (same algebra, float64 rounding times the conditioning).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.block_sparse_flash import MaskSpec, block_sparse_attention_reference
from spb2_jax.ops import moba_attention, moba_attention_reference
from spb2_jax.ops.moba_blockwise import needed_tiles, segment_bounds
from spb2_jax.ops.moba_gathered import moba_gathered_attention
from spb2_jax.ops.segments import Segments, segment_labels, segment_positions
from tests import oracles
from tests.helpers import (TOL_X64, assert_close, awkward_moba_selection, compare, kernel_case_id, kernel_inputs,
                           make_segment_ids, rng_for)

CASES = [
    # B, T, N, K, H, tile, layout
    (2, 64, 4, 2, 32, 16, "varlen"),  # GQA 2:1
    (2, 45, 2, 2, 64, 16, "short"),  # many short segments, length-1 segments, a hole; T % tile != 0
    (1, 1, 2, 1, 32, 16, "single"),  # T = 1
    (2, 40, 8, 2, 32, 32, "leftpad"),  # GQA 4:1, tile > C
    (2, 50, 8, 2, 32, 4, "varlen"),  # tile < C: part A's window spans several key tiles
]


def _dense(x, sel, labels, pos, C, scale):
    return (block_sparse_attention_reference(x["q"], x["k"], x["v"], labels, pos // C, sel, MaskSpec(moba=True),
                                             scale),)


@pytest.mark.parametrize("case", CASES, ids=map(kernel_case_id, CASES))
def test_gathered_equals_the_dense_mask_on_any_selection(case):
    """A hand-made selection with -1, repeats, the own block and later blocks (which must add nothing): forward
    and gradients of q, k, v."""
    C, R = 8, 3
    sel, seg = awkward_moba_selection(case, C, R)
    inputs, _ = kernel_inputs(case)
    labels, pos = segment_labels(seg), segment_positions(seg)
    scale = case[4] ** -0.5
    gathered = lambda x: (moba_gathered_attention(x["q"], x["k"], x["v"], sel, chunk_size=C,  # noqa: E731
                                                  segment_ids=seg, block_size=case[5]),)
    out, _ = compare("xla-moba-gathered", gathered, lambda x: _dense(x, sel, labels, pos, C, scale), inputs,
                     jnp.float32)
    assert np.all(np.asarray(out[0])[np.asarray(seg) == 0] == 0)  # padding tokens: 0


@pytest.mark.parametrize("offsets", [(3,), (0, 4), (5, 9)], ids=lambda o: "pos0=" + "+".join(map(str, o)))
def test_gathered_with_positions_not_starting_at_zero(offsets):
    """A segment whose positions start at p0 > 0 (a continuation) has a partial first block (none at all when
    p0 >= C): blocks are clamped to the segment as the dense mask defines them. Every earlier block selected."""
    B, T, N, K, H, C = 1, 32, 2, 1, 16, 4
    cuts = [0, 20, T] if len(offsets) == 2 else [0, T]
    ids, pos = np.zeros((B, T), np.int32), np.zeros((B, T), np.int32)
    for i, (a, b) in enumerate(zip(cuts[:-1], cuts[1:])):
        ids[:, a:b] = i + 1
        pos[:, a:b] = offsets[i] + np.arange(b - a)
    own = pos // C
    sel = jnp.asarray(np.stack([np.maximum(own - 1, -1), np.maximum(own - 2, -1)], -1)[:, :, None].repeat(N, 2))
    seg = Segments(ids=jnp.asarray(ids), labels=jnp.asarray(ids), positions=jnp.asarray(pos))
    inputs, _ = kernel_inputs((B, T, N, K, H, 8, "single"))
    gathered = lambda x: (moba_gathered_attention(x["q"], x["k"], x["v"], sel, chunk_size=C,  # noqa: E731
                                                  segment_ids=seg, block_size=8),)
    compare("xla-moba-gathered-pos0", gathered, lambda x: _dense(x, sel, seg.labels, seg.positions, C, H ** -0.5),
            inputs, jnp.float32)


@pytest.mark.parametrize("layout,C,topk", [("varlen", 5, 2), ("leftpad", 4, 3), ("short", 3, 4)])
def test_moba_attention_float64_equals_the_oracle(layout, C, topk):
    """``moba_attention`` (its own selection, the gathered XLA path) in float64 vs the NumPy oracle and vs the
    dense reference's gradients: pins masking, scale and the part-merge exactly."""
    B, T, N, K, H = 2, 37, 4, 2, 16
    seg = make_segment_ids(B, T, layout)
    rng = rng_for("moba-gathered-x64", layout, C, topk)
    q, k, v = rng.standard_normal((B, T, N, H)), rng.standard_normal((B, T, K, H)), rng.standard_normal((B, T, K, H))
    with jax.enable_x64(True):
        j = [jnp.asarray(x, jnp.float64) for x in (q, k, v)]
        s = jnp.asarray(seg)
        fast = jax.jit(lambda q, k, v: moba_attention(q, k, v, chunk_size=C, topk=topk, segment_ids=s, block_size=8,
                                                      algorithm="gathered"))
        out = fast(*j)
        assert out.dtype == jnp.float64
        assert_close(out, oracles.moba_attention(q, k, v, C, topk, seg), TOL_X64)
        w = jnp.asarray(rng.standard_normal(out.shape))
        grad = lambda f: jax.jit(jax.grad(lambda *x: jnp.sum(f(*x) * w), argnums=(0, 1, 2)))(*j)  # noqa: E731
        ref = lambda q, k, v: moba_attention_reference(q, k, v, chunk_size=C, topk=topk, segment_ids=s)  # noqa
        for got, want in zip(grad(fast), grad(ref)):
            assert_close(got, want, TOL_X64)


def test_union_algorithm_is_still_the_tile_loop_and_agrees():
    """``algorithm="union"`` keeps the query-tile loop (the benchmark's "before"); both equal the reference."""
    B, T, N, K, H, C, topk = 2, 50, 4, 2, 32, 8, 3
    seg = jnp.asarray(make_segment_ids(B, T, "varlen"))
    inputs, _ = kernel_inputs((B, T, N, K, H, 16, "varlen"))
    for algorithm in ("union", "gathered"):
        compare(f"xla-moba-{algorithm}", lambda x, a=algorithm: (moba_attention(
            x["q"], x["k"], x["v"], chunk_size=C, topk=topk, segment_ids=seg, block_size=16, algorithm=a),),
            lambda x: (moba_attention_reference(x["q"], x["k"], x["v"], chunk_size=C, topk=topk, segment_ids=seg),),
            inputs, jnp.float32)
    with pytest.raises(ValueError, match="algorithm='dense'"):
        moba_attention(*(jnp.asarray(inputs[n]) for n in "qkv"), chunk_size=C, topk=topk, algorithm="dense")


@pytest.mark.parametrize("layout", ["single", "varlen", "short", "leftpad"])
def test_causal_attention_visits_exactly_the_tiles_the_causal_mask_touches(layout):
    """Full causal attention on the XLA path (``causal_attention``: the tile loop with one block per segment)
    computes a (query tile, key tile) pair iff the dense causal mask inside segments has a pair there: never a
    tile above the diagonal (work ~ T^2 / 2 for one segment), nor one across segments. The table drives a
    ``lax.cond`` per pair (``moba_blockwise.moba_attention``)."""
    B, T, bs = 2, 64, 16
    ids = make_segment_ids(B, T, layout) if layout != "single" else np.ones((B, T), np.int32)
    seg = Segments.from_ids(jnp.asarray(ids))
    start, end = segment_bounds(seg)
    sel = jnp.zeros((B, T, 1, 0), jnp.int32)  # topk = 1: the own block (the whole segment) alone
    need = np.asarray(needed_tiles(sel, seg.positions // T, start, end, seg.real, T, bs, T // bs))
    labels = np.asarray(seg.labels)
    dense = (labels[:, :, None] == labels[:, None, :]) & (labels[:, :, None] != 0) & np.tri(T, dtype=bool)
    want = dense.reshape(B, T // bs, bs, T // bs, bs).any(axis=(2, 4))
    np.testing.assert_array_equal(need, want)
    if layout == "single":
        assert need.sum() == B * (T // bs) * (T // bs + 1) // 2  # the lower triangle
