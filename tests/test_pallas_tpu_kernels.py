"""The TPU-style kernels (``target="mosaic_tpu"``: scalar-prefetched lists driving the grid, VMEM accumulators)
run in interpret mode on CPU through the same ``spb2_jax.ops`` entry points and the same checks as the GPU-style
kernels in ``test_pallas_kernels`` (forward AND gradients vs the XLA path, float32 1e-4; bf16 with the bound
derived there), passing ``target="mosaic_tpu"``. The fixture asserts that only TPU-style kernels ran.
"""

from __future__ import annotations

import jax.numpy as jnp
import pytest
from jax.experimental import pallas as pl

from tests import test_pallas_kernels as gpu_style
from tests.test_ops_fast import F32_ATOL, check, compare
from tests.test_ops_reference import gdn_inputs, rng_for
from tests.test_pallas_kernels import (ATTN_CASES, BF16_CASES, DEFAULT, GDN_CASES, GDN_IDS, MOBA_CASES, SWA_GRID,
                                       _attn_id, _attn_inputs, _ops, params)

TPU = "mosaic_tpu"


@pytest.fixture
def tpu_style(monkeypatch):
    """Records every ``pallas_call`` name and checks they are TPU kernels."""
    names = []
    real = pl.pallas_call

    def recording(*args, **kwargs):
        names.append(kwargs.get("name"))
        return real(*args, **kwargs)

    monkeypatch.setattr(pl, "pallas_call", recording)
    yield
    assert names and all(n.endswith("_tpu") for n in names), names


@pytest.mark.parametrize("case,window", params(SWA_GRID, [f"{_attn_id(c)}-w{w}" for c, w in SWA_GRID],
                                               lambda i: i.startswith("B2-T50") and i.endswith("w7")))
def test_sliding_window_kernel_tpu(tpu_style, case, window):
    gpu_style.test_sliding_window_kernel(case, window, target=TPU)


@pytest.mark.parametrize("case,C,topk", params(MOBA_CASES, [f"{_attn_id(c)}-C{C}-top{k}" for c, C, k in MOBA_CASES],
                                                lambda i: i.rsplit("-", 2)[0] in DEFAULT and i.endswith("C8-top3")))
def test_moba_kernel_tpu(tpu_style, case, C, topk):
    gpu_style.test_moba_kernel(case, C, topk, target=TPU)


@pytest.mark.parametrize("case", ATTN_CASES[1:3], ids=_attn_id)
@pytest.mark.slow
def test_moba_kernel_topk_covering_all_blocks_is_dense_causal_tpu(tpu_style, case):
    gpu_style.test_moba_kernel_topk_covering_all_blocks_is_dense_causal(case, target=TPU)


@pytest.mark.parametrize("case", params([(c,) for c in ATTN_CASES], map(_attn_id, ATTN_CASES),
                                        lambda i: i.endswith("short")))
def test_causal_kernel_tpu(tpu_style, case):
    gpu_style.test_causal_kernel(case, target=TPU)


@pytest.mark.parametrize("name,kw,spec", params(BF16_CASES, [c[0] for c in BF16_CASES], lambda i: i == "moba"))
def test_attention_kernels_bf16_tpu(tpu_style, name, kw, spec):
    gpu_style.test_attention_kernels_bf16(name, kw, spec, target=TPU)


@pytest.mark.parametrize("case", params([(c,) for c in GDN_CASES], GDN_IDS, lambda i: i.endswith("varlen")))
def test_gated_delta_rule_kernel_tpu(tpu_style, case):
    gpu_style.test_gated_delta_rule_kernel(case, target=TPU)


@pytest.mark.parametrize("name,kw", [("moba", dict(chunk_size=64, topk=3)), ("swa", dict(window=130))],
                         ids=["moba-C64-top3", "swa-w130"])
def test_tpu_kernels_with_the_tile_a_tpu_takes(tpu_style, name, kw):
    """The 128-token tile the TPU kernels need on hardware (the other cases use 16/32 to stay fast in interpret
    mode): T = 300 padded to three tiles, GQA 2:1 with two kv heads, forward and gradients vs the XLA path."""
    case = (1, 300, 4, 2, 32, 128, "varlen")
    inputs, seg = _attn_inputs(case)
    compare(f"pallas-tpu-tile128-{name}", *_ops(name, seg, 128, TPU, **kw), inputs, jnp.float32, 1)


@pytest.mark.parametrize("kernel", ["moba", "swa", "gdn"])
def test_tpu_kernels_under_the_tpu_simulator(kernel):
    """jax's TPU interpret mode (``pltpu.InterpretParams``) simulates the chip more closely than plain interpret
    mode: two cores splitting the "parallel" grid dimensions in a randomised order, a race detector,
    uninitialised memory filled with NaN, out-of-bounds reads and non-consecutive revisits of an output block
    raising. MoBA and SWA (forward + gradients) at the 128-token tile, GQA 2:1 with two kv heads, against the XLA
    path, and the GDN forward (segments inside chunks, a length-1 run) against the GPU-style kernel (float32
    1e-4); no race found. (Declaring the list dimension, or GDN's chunk dimension, "parallel" makes the MoBA,
    resp. GDN, case fail: checked.)"""
    from jax._src.pallas.mosaic.interpret import interpret_pallas_call  # private: the race detector's verdict
    from jax.experimental.pallas import tpu as pltpu

    from pallas_kernels.block_sparse_flash import BlockSizes
    from pallas_kernels.gated_delta_rule import gated_delta_rule_fwd
    from pallas_kernels.moba import moba_flash_attention
    from pallas_kernels.sliding_window import sliding_window_flash_attention
    from spb2_jax.ops.moba_blockwise import moba_attention, moba_select_blocks
    from spb2_jax.ops.segments import segment_labels, segment_positions
    from spb2_jax.ops.swa_blockwise import sliding_window_attention

    sim = pltpu.InterpretParams(detect_races=True, num_cores_or_threads=2, random_seed=0)
    interpret_pallas_call.reset_tpu_interpret_mode_state()
    if kernel == "gdn":  # chunks sequential, heads split over the two cores; the GPU-style kernel == XLA path
        B, T, H, Dk, C = 2, 256, 2, 32, 64
        q, k, v, g, beta, s0 = (jnp.asarray(x) for x in gdn_inputs(rng_for("pallas-gdn-sim"), B, T, H, Dk, Dk, 1.0,
                                                                         True))
        unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731  prepared as by the ops
        q, k = unit(q) * Dk ** -0.5, unit(k)
        runs = jnp.asarray([[0] * 90 + [1] * 166, [0] * 64 + [1] * 1 + [2] * 191], jnp.int32)
        before = jnp.asarray([[0, 0, 1, 1], [0, 0, 2, 2]], jnp.int32)  # the run owning each chunk's incoming state
        args = (q, k, v, g, beta, runs, before, s0)
        want = gated_delta_rule_fwd(*args, chunk_size=C, interpret=True, target="triton")
        got = gated_delta_rule_fwd(*args, chunk_size=C, interpret=sim, target="mosaic_tpu")
        for name, a, e in zip(("o", "state"), got, want):
            check(f"gdn {name} under the TPU simulator", "pallas-tpu-sim-gdn", a, e, 1e-4, F32_ATOL)
    else:
        case = (1, 300, 4, 2, 32, 128, "varlen")
        inputs, seg = _attn_inputs(case)
        labels, pos = segment_labels(seg), segment_positions(seg)
        tile = BlockSizes(128)

        def moba(x):
            sel = moba_select_blocks(x["q"], x["k"], chunk_size=64, topk=3, segment_ids=seg)
            return (moba_flash_attention(x["q"], x["k"], x["v"], sel=sel, seg=labels, pos=pos, chunk_size=64,
                                         block_sizes=tile, interpret=sim, target="mosaic_tpu"),)

        def swa(x):
            return (sliding_window_flash_attention(x["q"], x["k"], x["v"], window=130, seg=labels, block_sizes=tile,
                                                   interpret=sim, target="mosaic_tpu"),)

        def moba_xla(x):
            return (moba_attention(x["q"], x["k"], x["v"], chunk_size=64, topk=3, segment_ids=seg, impl="xla"),)

        def swa_xla(x):
            return (sliding_window_attention(x["q"], x["k"], x["v"], window=130, segment_ids=seg, impl="xla"),)

        fast, ref = (moba, moba_xla) if kernel == "moba" else (swa, swa_xla)
        compare(f"pallas-tpu-sim-{kernel}", fast, ref, inputs, jnp.float32, 1)
    assert interpret_pallas_call.races is not None and not interpret_pallas_call.races.races_found
