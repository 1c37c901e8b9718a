"""Pallas kernels (interpret mode on CPU) against the level above them, the XLA paths (``impl="xla"``), for both
targets: ``"triton"`` (the GPU-style kernels) and ``"mosaic_tpu"`` (TPU-style: scalar-prefetched lists driving the
grid, VMEM accumulators), through the same ``spb2_jax.ops`` entry points; the ``pallas_target`` fixture checks that
only the kernels of the requested target ran. The default selection runs the cases marked there (the rest of each
grid is slow); ``test_pallas_tpu_kernels`` adds what only the TPU kernels need (the 128 tile, the TPU simulator).

float32 cases use ``helpers.compare``: forward AND gradients of every input, bound 1e-4 * max|ref| + 1e-6 (both
sides are float32 computations of the same function in a different order).

bfloat16 (attention kernels) — the bound, derived. The XLA path upcasts the bf16 inputs to float32 and rounds
only its result; the kernel feeds bf16 operands to its matmuls (exact products, float32 accumulation), so its
extra error is the rounding of the float32 operands it builds itself to bf16 (relative u = 2^-9 each):
- forward: ``o = sum_s round(p_s) v_s / l`` with ``|round(p) - p| <= u p``, so ``|d o| <= u sum_s p_s |v_s| / l
  <= u max|v|``; both outputs are then rounded to bf16 (the 2-ulp ``BF16_OUT_RTOL`` of ``tests/helpers.py``);
- gradients: ``dV = sum_t round(p) dO`` errs by ``<= u E_dv`` with the envelope ``E_dv = P^T |dO|``; ``dQ =
  scale sum_s round(dS) K`` and ``dK`` by ``<= u scale E_dS |K|`` (resp. ``E_dS^T |Q|``), where ``E_dS = P *
  (|dO| |V|^T + rowsum(|O| |dO|))`` bounds ``|dS|``; delta = rowsum(O dO) uses the bf16-rounded output, another
  ``u rowsum(|O| |dO|)`` inside E_dS. So each gradient is allowed ``2 u E`` (the two roundings) plus the 4-ulp
  ``BF16_GRAD_RTOL`` of the final cast. Envelopes are computed in numpy float64 from the dense mask.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.block_sparse_flash import (BlockSizes, MaskSpec, block_sparse_attention,
                                               block_sparse_attention_reference, dense_mask)
from pallas_kernels.moba import moba_flash_attention, moba_tile_lists
from pallas_kernels.moba_gathered import own_block_lists, row_capacity, selected_block_rows
from spb2_jax.ops.attention import attention_reference
from spb2_jax.ops.gdn_chunked import chunk_gated_delta_rule
from spb2_jax.ops.moba_blockwise import moba_attention, moba_select_blocks
from spb2_jax.ops.segments import segment_labels, segment_positions
from tests import oracles
from tests.helpers import (BF16_GRAD_RTOL, BF16_OUT_RTOL, BF16_U, F32_ATOL, TOL_ATTN, assert_close, attention_ops,
                           awkward_moba_selection, check, compare, gdn_inputs, kernel_case_id, kernel_inputs, make_segment_ids, params, randn, rng_for,
                           shape_id)

TARGETS = ("triton", "mosaic_tpu")
ATTN_CASES = [
    # B, T, N, K, H, tile, layout
    (1, 1, 2, 1, 32, 16, "single"),
    (2, 75, 4, 1, 32, 16, "varlen"),  # GQA 4:1, T % tile != 0
    (2, 45, 2, 2, 64, 16, "short"),  # many short segments, length-1 segments, a hole
    (2, 40, 2, 1, 32, 32, "leftpad"),
    (2, 50, 8, 2, 32, 16, "varlen"),  # GQA 4:1 with two kv heads: catches a wrong query-head -> kv-head map
]
GQA, SHORT = ATTN_CASES[4], ATTN_CASES[2]  # the default selection's cases: between them GQA 4:1 with K > 1,
# T % tile != 0, short / length-1 segments, a hole
SWA_WINDOWS = (2, 7, 128)  # 128 > T: plain causal (window 1: test_sliding_window_kernel_window_one)


def kernel_grid(cases, ids, default):
    """``pytest.param(*case, target)`` for every case and target (for the indirect ``pallas_target`` fixture),
    marked slow unless ``default(*case, target)``."""
    return [pytest.param(*c, t, id=f"{i}-{t}", marks=() if default(*c, t) else pytest.mark.slow)
            for c, i in zip(cases, ids) for t in TARGETS]



def _single_key_cancellation(case, inputs):
    """For T = 1 the only query sees only its own key, so ``dq = scale (dP - delta) k`` is exactly 0: the
    difference of two float32 dot products of the same H terms (``dP = dO . v`` in the kernel, ``delta =
    rowsum(O * dO)`` with ``O = v`` in XLA). Each errs by at most ``gamma_H sum_d |dO_d v_d|`` with ``gamma_H =
    H u / (1 - H u)``, ``u = 2^-24``, so each side's ``|dq| <= 2 gamma_H scale sum_d |dO_d v_d| max|k|``; the
    comparison allows both sides that much. ``dk = scale sum_g dS_g q_g`` over the GQA group cancels the same way
    (``sum_g 2 gamma_H scale sum_d |dO_g,d v_d| max|q_g|`` per side). None for T > 1: there the relative bound
    covers it."""
    B, T, N, K, H = case[:5]
    if T != 1:
        return None
    u = 2.0 ** -24
    gamma = H * u / (1 - H * u)
    v = np.repeat(np.asarray(inputs["v"], np.float64), N // K, axis=2)
    k = np.repeat(np.asarray(inputs["k"], np.float64), N // K, axis=2)
    q = np.asarray(inputs["q"], np.float64)

    def allowance(ws):
        dp_terms = np.sum(np.abs(ws[0] * v), axis=-1)  # [B, 1, N]: sum_d |dO_d v_d| per query head
        both = 2 * 2 * gamma * H ** -0.5
        dk_terms = (dp_terms * np.max(np.abs(q), axis=-1)).reshape(B, 1, K, N // K).sum(-1)
        return {"q": float(both * np.max(dp_terms * np.max(np.abs(k), axis=-1))), "k": float(both * np.max(dk_terms))}

    return allowance


SWA_GRID = [(c, w) for c in ATTN_CASES for w in SWA_WINDOWS]


@pytest.mark.parametrize("case,window,pallas_target", kernel_grid(
    SWA_GRID, [kernel_case_id(c, W=w) for c, w in SWA_GRID],
    lambda c, w, t: w == 7 and c in ((GQA, SHORT) if t == "triton" else (GQA,))), indirect=["pallas_target"])
def test_sliding_window_kernel(case, window, pallas_target):
    inputs, seg = kernel_inputs(case)
    compare(f"pallas-swa-w{window}", *attention_ops("swa", seg, case[5], pallas_target, window=window), inputs,
            jnp.float32, cancellation=_single_key_cancellation(case, inputs))


@pytest.mark.parametrize("case,pallas_target", kernel_grid([(c,) for c in ATTN_CASES], map(kernel_case_id, ATTN_CASES),
                                                            lambda c, t: t == "triton"), indirect=["pallas_target"])
def test_sliding_window_kernel_window_one(case, pallas_target):
    """Window 1: every real token attends to itself only, so ``o_t = v_t`` (its kv head) and padding gives 0.
    (Its gradient w.r.t. q is identically 0 = dP - delta, a cancellation: compared in the other windows.)"""
    inputs, seg = kernel_inputs(case)
    pallas, _ = attention_ops("swa", seg, case[5], pallas_target, window=1)
    (o,) = pallas({n: jnp.asarray(a) for n, a in inputs.items()})
    G = case[2] // case[3]
    want = np.repeat(inputs["v"], G, axis=2) * (np.asarray(seg) != 0)[..., None, None]
    np.testing.assert_allclose(np.asarray(o), want, rtol=1e-6, atol=0)


MOBA_CASES = [(c, C, topk) for c in ATTN_CASES for C, topk in ((8, 3), (4, 2))]


@pytest.mark.parametrize("case,C,topk,pallas_target", kernel_grid(
    MOBA_CASES, [kernel_case_id(c, C=C, top=k) for c, C, k in MOBA_CASES],
    lambda c, C, k, t: c in (GQA, SHORT) and (t == "triton" or C == 8)), indirect=["pallas_target"])
def test_moba_kernel(case, C, topk, pallas_target):
    inputs, seg = kernel_inputs(case)
    compare(f"pallas-moba-C{C}-top{topk}",
            *attention_ops("moba", seg, case[5], pallas_target, chunk_size=C, topk=topk), inputs, jnp.float32,
            cancellation=_single_key_cancellation(case, inputs))


@pytest.mark.parametrize("case,pallas_target", kernel_grid([(c,) for c in ATTN_CASES[1:3]],
                                                            map(kernel_case_id, ATTN_CASES[1:3]),
                                                            lambda c, t: t == "triton"), indirect=["pallas_target"])
def test_moba_kernel_topk_covering_all_blocks_is_dense_causal(case, pallas_target):
    """topk >= number of blocks: every earlier block is selected, MoBA is plain causal attention."""
    inputs, seg = kernel_inputs(case)
    T = case[1]
    pallas, _ = attention_ops("moba", seg, case[5], pallas_target, chunk_size=8, topk=-(-T // 8) + 1)

    def dense(x):
        return (attention_reference(x["q"], x["k"], x["v"], segment_ids=seg, causal=True),)

    compare("pallas-moba-all-blocks", pallas, dense, inputs, jnp.float32)


@pytest.mark.parametrize("case,pallas_target", kernel_grid([(c,) for c in ATTN_CASES], map(kernel_case_id, ATTN_CASES),
                                                            lambda c, t: c == (GQA if t == "triton" else SHORT)),
                         indirect=["pallas_target"])
def test_causal_kernel(case, pallas_target):
    inputs, seg = kernel_inputs(case)
    compare("pallas-causal", *attention_ops("causal", seg, case[5], pallas_target), inputs, jnp.float32,
            cancellation=_single_key_cancellation(case, inputs))


def _padded_selection(case, C, topk):
    """``(Tp, labels, pos, sel)``: the case's real MoBA selection and metadata, padded to whole tiles."""
    inputs, seg = kernel_inputs(case)
    T, tile = case[1], case[5]
    Tp = -(-T // tile) * tile
    pad = lambda x, val=0: jnp.pad(x, [(0, 0), (0, Tp - T)] + [(0, 0)] * (x.ndim - 2),  # noqa: E731
                                   constant_values=val)
    sel = moba_select_blocks(jnp.asarray(inputs["q"]), jnp.asarray(inputs["k"]), chunk_size=C, topk=topk,
                             segment_ids=seg)
    return Tp, pad(segment_labels(seg)), pad(segment_positions(seg)), pad(sel, -1)




LIST_CASES = [(c, C, k) for c in ATTN_CASES[1:] for C, k in ((8, 3), (16, 2))]
LIST_GRID = params(LIST_CASES, [kernel_case_id(c, C=C, top=k) for c, C, k in LIST_CASES],
                   lambda c, C, k: c in (GQA, SHORT))


@pytest.mark.parametrize("case,C,topk", LIST_GRID)
def test_moba_tile_lists_are_exact(case, C, topk):
    """The lists hold exactly the key tiles that contain at least one unmasked key for some token of the query
    tile (superset: correctness; nothing more: no wasted visits), checked against the dense mask."""
    B, T, N, K, H, tile, layout = case
    Tp, labels, pos, sel = _padded_selection(case, C, topk)
    fwd, fwd_n, bwd, bwd_n = (np.asarray(x) for x in moba_tile_lists(sel, labels, pos, C, tile))
    mask = np.asarray(dense_mask(labels, pos // C, sel, MaskSpec(moba=True)))  # [B, N, Tp, Tp]
    nT = Tp // tile
    want = mask.reshape(B, N, nT, tile, nT, tile).any(axis=(3, 5))  # [B, N, i, j]
    got = np.zeros_like(want)
    got_t = np.zeros_like(want)
    for b, n, i in np.ndindex(B, N, nT):
        got[b, n, i, fwd[b, n, i, :fwd_n[b, n, i]]] = True
        got_t[b, n, bwd[b, n, i, :bwd_n[b, n, i]], i] = True
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(got_t, want)
    assert all(np.all(np.diff(fwd[b, n, i, :fwd_n[b, n, i]]) > 0) for b, n, i in np.ndindex(B, N, nT))


def test_core_equals_its_dense_twin():
    """``block_sparse_attention`` with MoBA lists equals ``block_sparse_attention_reference`` (dense mask)."""
    case = (2, 64, 4, 2, 32, 16, "varlen")
    inputs, seg = kernel_inputs(case)
    q, k, v = (jnp.asarray(inputs[n]) for n in "qkv")
    sel = moba_select_blocks(q, k, chunk_size=8, topk=3, segment_ids=seg)
    labels, pos = segment_labels(seg), segment_positions(seg)
    meta = moba_tile_lists(sel, labels, pos, 8, 16) + (labels, pos // 8, sel)
    got = block_sparse_attention(q, k, v, meta, MaskSpec(moba=True), 32 ** -0.5, 16, interpret=True, target="triton")
    want = block_sparse_attention_reference(q, k, v, labels, pos // 8, sel, MaskSpec(moba=True), 32 ** -0.5)
    check("core vs dense twin", got, want, 1e-4, F32_ATOL)


# ----------------------------------------------------------------------------------------------- gathered MoBA
ALGO_CASES = [(2, 64, 4, 2, 32, 16, "varlen"), SHORT, (1, 1, 2, 1, 32, 16, "single"), (2, 40, 8, 2, 32, 32, "leftpad")]


@pytest.mark.parametrize("algorithm,pallas_target", [("gathered", "triton"), ("union", "triton"),
                                                     ("gathered", "mosaic_tpu")], indirect=["pallas_target"])
@pytest.mark.parametrize("case", params([(c,) for c in ALGO_CASES], map(kernel_case_id, ALGO_CASES),
                                        lambda c: c[1] == 64 or c == SHORT))
def test_moba_algorithms_equal_the_dense_mask_on_any_selection(case, algorithm, pallas_target):
    """``moba_flash_attention`` (both algorithms GPU style, gathered TPU style) on a hand-made selection with -1,
    repeats, the own block and later blocks vs ``block_sparse_attention_reference`` (dense mask): forward and
    gradients."""
    C, R = 8, 3
    sel, seg = awkward_moba_selection(case, C, R)
    inputs, _ = kernel_inputs(case)
    labels, pos = segment_labels(seg), segment_positions(seg)
    scale = case[4] ** -0.5

    def kernel(x):
        return (moba_flash_attention(x["q"], x["k"], x["v"], sel=sel, seg=labels, pos=pos, chunk_size=C,
                                     block_sizes=BlockSizes(case[5]), interpret=True, target=pallas_target,
                                     algorithm=algorithm),)

    def dense(x):
        return (block_sparse_attention_reference(x["q"], x["k"], x["v"], labels, pos // C, sel,
                                                 MaskSpec(moba=True), scale),)

    compare(f"pallas-moba-{algorithm}-{pallas_target}-awkward", kernel, dense, inputs, jnp.float32,
            cancellation=_single_key_cancellation(case, inputs))


@pytest.mark.parametrize("pallas_target", TARGETS, indirect=True)
@pytest.mark.parametrize("offsets", [(3,), (4,), (0, 4), (5, 9)], ids=lambda o: "pos0=" + "+".join(map(str, o)))
def test_gathered_moba_with_positions_not_starting_at_zero(offsets, pallas_target):
    """A segment whose positions start at p0 > 0 (a continuation) has a partial first block (and none at all
    when p0 >= C): the gathered kernels clamp blocks to the segment, as the dense mask defines them. Two
    segments of 20 and 12 tokens (or one of 32), every earlier block selected, R = 2 with a repeat."""
    B, T, N, K, H, C = 1, 32, 2, 1, 16, 4
    cuts = [0, 20, T] if len(offsets) == 2 else [0, T]
    seg = np.zeros((B, T), np.int32)
    pos = np.zeros((B, T), np.int32)
    for i, (a, b) in enumerate(zip(cuts[:-1], cuts[1:])):
        seg[:, a:b] = i + 1
        pos[:, a:b] = offsets[i] + np.arange(b - a)
    own = pos // C
    sel = np.stack([np.maximum(own - 1, -1), np.maximum(own - 2, -1)], -1)[:, :, None].repeat(N, 2)
    sel = jnp.asarray(sel, jnp.int32)
    seg, pos = jnp.asarray(seg), jnp.asarray(pos)
    inputs, _ = kernel_inputs((B, T, N, K, H, 16, "single"))

    def kernel(x):
        return (moba_flash_attention(x["q"], x["k"], x["v"], sel=sel, seg=seg, pos=pos, chunk_size=C,
                                     block_sizes=BlockSizes(16), interpret=True, target=pallas_target,
                                     algorithm="gathered"),)

    def dense(x):
        return (block_sparse_attention_reference(x["q"], x["k"], x["v"], seg, pos // C, sel, MaskSpec(moba=True),
                                                 H ** -0.5),)

    compare(f"pallas-moba-gathered-pos0-{pallas_target}", kernel, dense, inputs, jnp.float32)


@pytest.mark.parametrize("pallas_target", TARGETS, indirect=True)
def test_gathered_moba_kernels_equal_the_float64_oracle(pallas_target):
    """The default Pallas MoBA (gathered, each target) through ``moba_attention(impl="pallas")``, float32, vs the
    float64 NumPy oracle (its own selection): within TOL_ATTN, the float32 bound of the attention ops
    (``tests/helpers.py``). T = 37 (not a multiple of the 16-token tile), packed segments, GQA 2:1, C = 5, k = 3."""
    B, T, N, K, H, C, topk = 2, 37, 4, 2, 16, 5, 3
    seg = make_segment_ids(B, T, "varlen")
    rng = rng_for("pallas-moba-x64", pallas_target)
    q, k, v = rng.standard_normal((B, T, N, H)), rng.standard_normal((B, T, K, H)), rng.standard_normal((B, T, K, H))
    out = moba_attention(*(jnp.asarray(x, jnp.float32) for x in (q, k, v)), chunk_size=C, topk=topk,
                         segment_ids=jnp.asarray(seg), block_size=16, impl="pallas", interpret=True,
                         target=pallas_target)
    assert_close(out, oracles.moba_attention(q, k, v, C, topk, seg), TOL_ATTN, f"pallas moba {pallas_target}")


@pytest.mark.parametrize("case,C,topk", LIST_GRID)
def test_gathered_rows_hold_each_selected_pair_once(case, C, topk):
    """``selected_block_rows``: every valid (token, selected block) pair is exactly one row, in a row tile whose
    block is that block; no tile mixes blocks; tiles are ordered by block start; the row capacity is not
    exceeded; and ``kv_first / kv_count`` name exactly the row tiles whose block overlaps each key tile."""
    B, T, N, K, H, tile, layout = case
    Tp, labels, pos, sel = _padded_selection(case, C, topk)
    sr = [np.asarray(x) for x in selected_block_rows(sel, labels, pos, C, tile)]
    rows, tile_lo, tile_hi, kv_first, kv_count = sr
    assert rows.shape[-1] == row_capacity(Tp, topk - 1, C, tile) * tile
    sel, labels, pos = np.asarray(sel), np.asarray(labels), np.asarray(pos)
    nT = Tp // tile
    for b, n in np.ndindex(B, N):
        want = sorted((t, int(t - pos[b, t] + r * C)) for t in range(Tp) for r in set(sel[b, t, n].tolist())
                      if labels[b, t] != 0 and 0 <= r < pos[b, t] // C)
        lo_of_row = np.repeat(tile_lo[b, n], tile)
        got = sorted((int(t), int(lo)) for t, lo in zip(rows[b, n], lo_of_row) if t >= 0)
        assert got == want
        used = tile_lo[b, n] < Tp
        np.testing.assert_array_equal(tile_hi[b, n][used], tile_lo[b, n][used] + C)  # positions from 0: whole blocks
        assert np.all(used[:used.sum()]) and np.all(np.diff(tile_lo[b, n][used]) >= 0)  # used tiles first, sorted
        assert all(np.sum(rows[b, n, p * tile:(p + 1) * tile] >= 0) > 0 for p in np.flatnonzero(used))
        for j in range(nT):
            overlap = [p for p in np.flatnonzero(used)
                       if tile_lo[b, n, p] < (j + 1) * tile and tile_hi[b, n, p] > j * tile]
            assert list(range(kv_first[b, n, j], kv_first[b, n, j] + kv_count[b, n, j])) == overlap


OWN_BLOCK_CASES = [(c, C) for c in ATTN_CASES[1:] for C in (8, 40)]


@pytest.mark.parametrize("case,C", params(OWN_BLOCK_CASES, [kernel_case_id(c, C=C) for c, C in OWN_BLOCK_CASES],
                                          lambda c, C: c in (GQA, SHORT)))
def test_own_block_lists_cover_exactly_the_own_block(case, C):
    """Part A's band lists (forward and transposed) name exactly the tiles holding an own-block key, checked
    against the dense mask with no selection."""
    B, T, N, K, H, tile, layout = case
    Tp = -(-T // tile) * tile
    seg = jnp.pad(jnp.asarray(make_segment_ids(B, T, layout)), [(0, 0), (0, Tp - T)])
    labels, pos = segment_labels(seg), segment_positions(seg)
    fwd, fwd_n, bwd, bwd_n = (np.asarray(x) for x in own_block_lists(labels, pos, C, tile, N))
    none = jnp.full((B, Tp, N, 1), -1, jnp.int32)
    mask = np.asarray(dense_mask(labels, pos // C, none, MaskSpec(moba=True)))
    nT = Tp // tile
    want = mask.reshape(B, N, nT, tile, nT, tile).any(axis=(3, 5))
    got, got_t = np.zeros_like(want), np.zeros_like(want)
    for b, n, i in np.ndindex(B, N, nT):
        got[b, n, i, fwd[b, n, i, :fwd_n[b, n, i]]] = True
        got_t[b, n, bwd[b, n, i, :bwd_n[b, n, i]], i] = True
    assert np.all(got >= want) and np.all(got_t >= want)  # a superset: correctness
    rows_with_tokens = (np.asarray(labels).reshape(B, nT, tile) != 0).any(-1)[:, None, :, None]
    np.testing.assert_array_equal(got & rows_with_tokens, want)  # contiguous bands: exact where tokens are
    assert fwd.shape[-1] <= -(-(C - 1) // tile) + 1


# ----------------------------------------------------------------------------------------------- bfloat16
def _envelopes(x, mask, scale, do, o):
    """float64 envelopes of the module docstring: ``(E_o = max|v| scalar, E_dq, E_dk, E_dv)``, GQA-aware."""
    q, k, v = (np.asarray(x[n], np.float64) for n in "qkv")
    B, T, N, H = q.shape
    K = k.shape[2]
    G = N // K
    kk, vv = np.repeat(k, G, axis=2), np.repeat(v, G, axis=2)  # [B, T, N, H] per query head
    logits = np.einsum("btnd,bsnd->bnts", q, kk) * scale
    logits = np.where(mask, logits, -np.inf)
    m = np.max(logits, axis=-1, keepdims=True)
    p = np.where(mask, np.exp(logits - np.where(np.isfinite(m), m, 0.0)), 0.0)
    p = p / np.maximum(p.sum(-1, keepdims=True), 1e-300)
    ado, ao = np.abs(np.asarray(do, np.float64)), np.abs(np.asarray(o, np.float64))
    e_ds = p * (np.einsum("btnd,bsnd->bnts", ado, np.abs(vv)) + np.einsum("btnd,btnd->bnt", ao, ado)[..., None])
    e_dq = scale * np.einsum("bnts,bsnd->btnd", e_ds, np.abs(kk))
    fold = lambda e: e.reshape(B, T, K, G, H).sum(3)  # noqa: E731
    e_dk = fold(scale * np.einsum("bnts,btnd->bsnd", e_ds, np.abs(q)))
    e_dv = fold(np.einsum("bnts,btnd->bsnd", p, ado))
    return float(np.max(np.abs(v))), e_dq, e_dk, e_dv


BF16_CASES = [("swa", dict(window=7), MaskSpec(window=7)), ("moba", dict(chunk_size=8, topk=3), None),
              ("causal", {}, MaskSpec())]


@pytest.mark.parametrize("name,kw,spec,pallas_target", kernel_grid(
    BF16_CASES, [c[0] for c in BF16_CASES], lambda name, kw, spec, t: name == "moba" or (t, name) == ("triton", "swa")),
    indirect=["pallas_target"])
def test_attention_kernels_bf16(name, kw, spec, pallas_target):
    case = (2, 75, 4, 1, 32, 16, "varlen")
    inputs, seg = kernel_inputs(case)
    x16 = {n: jnp.asarray(a, jnp.bfloat16) for n, a in inputs.items()}
    x32 = {n: jnp.asarray(a, jnp.float32) for n, a in x16.items()}  # the same rounded values
    pallas, xla = attention_ops(name, seg, case[5], pallas_target, **kw)
    do = jnp.asarray(jnp.asarray(randn(rng_for("bf16-do", name), *case[:3], case[4]), jnp.bfloat16), jnp.float32)
    o16, vjp16 = jax.vjp(lambda x: pallas(x)[0].astype(jnp.float32), x16)
    o32, vjp32 = jax.vjp(lambda x: xla(x)[0], x32)
    (g16,), (g32,) = vjp16(do), vjp32(do)
    labels, pos = segment_labels(seg), segment_positions(seg)
    if name == "moba":
        sel = moba_select_blocks(x32["q"], x32["k"], chunk_size=8, topk=3, segment_ids=seg)
        mask = dense_mask(labels, pos // 8, sel, MaskSpec(moba=True))
    else:
        mask = dense_mask(labels, jnp.zeros_like(pos), jnp.full(case[:3] + (1,), -1, jnp.int32), spec)
    e_o, e_dq, e_dk, e_dv = _envelopes(x32, np.asarray(mask), 32 ** -0.5, do, o32)
    check(f"{name} bf16 out", o16, np.asarray(o32), BF16_OUT_RTOL, BF16_U * e_o + F32_ATOL)
    for n, env in (("q", e_dq), ("k", e_dk), ("v", e_dv)):
        a, e = np.asarray(g16[n], np.float64), np.asarray(g32[n], np.float64)
        allowed = 2 * BF16_U * env + BF16_GRAD_RTOL * np.max(np.abs(e)) + F32_ATOL
        assert np.all(np.abs(a - e) <= allowed), \
            f"{name} bf16 grad[{n}]: worst excess {np.max(np.abs(a - e) - allowed):.3e}"


# ----------------------------------------------------------------------------------------------- gated delta rule
GDN_CASES = [
    # B, T, N, H, E, C, layout, init
    (1, 1, 2, 64, 64, 16, "single", False),
    (2, 75, 2, 64, 32, 16, "varlen", True),
    (2, 30, 1, 32, 32, 8, "short", True),
    (2, 37, 1, 64, 64, 16, "leftpad", True),
]


@pytest.mark.parametrize("case,pallas_target", kernel_grid(
    [(c,) for c in GDN_CASES], [shape_id(c[6], B=c[0], T=c[1], N=c[2], H=c[3], E=c[4], C=c[5]) for c in GDN_CASES],
    lambda c, t: c[6] == "varlen" or (t, c[6]) == ("triton", "short")), indirect=["pallas_target"])
def test_gated_delta_rule_kernel(case, pallas_target):
    """Forward output and final state of the kernel vs the XLA chunked path. The gradients ``compare`` also checks
    are the XLA path's backward by construction (custom VJP), so they test the VJP wiring only, not a kernel."""
    B, T, N, H, E, C, layout, init = case
    q, k, v, g, beta, s0 = gdn_inputs(rng_for("pallas-gdn", case), B, T, N, H, E, 1.0, init)
    seg = jnp.asarray(make_segment_ids(B, T, layout))
    inputs = dict(q=q, k=k, v=v, g=g, beta=beta) | (dict(s0=s0) if init else {})

    def run(impl, x, **pallas):
        return chunk_gated_delta_rule(x["q"], x["k"], x["v"], x["g"], x["beta"], initial_state=x.get("s0"),
                                      segment_ids=seg, chunk_size=C, impl=impl, **pallas)

    compare("pallas-gdn", functools.partial(run, "pallas", interpret=True, target=pallas_target),
            functools.partial(run, "xla"), inputs, jnp.float32)
