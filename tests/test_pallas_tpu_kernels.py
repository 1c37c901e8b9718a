"""What only the TPU-style kernels (``target="mosaic_tpu"``) need, in interpret mode on CPU: the 128-token tile they
take on hardware, and jax's TPU simulator. (Every kernel test of ``test_pallas_kernels`` runs both targets.)"""

from __future__ import annotations

import jax.numpy as jnp
import pytest
from jax._src.pallas.mosaic.interpret import interpret_pallas_call  # private: the race detector's verdict
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.block_sparse_flash import BlockSizes
from pallas_kernels.gated_delta_rule import gated_delta_rule_fwd
from pallas_kernels.moba import moba_flash_attention
from pallas_kernels.sliding_window import sliding_window_flash_attention
from spb2_jax.ops.moba_blockwise import moba_attention, moba_select_blocks
from spb2_jax.ops.segments import segment_labels, segment_positions
from spb2_jax.ops.swa_blockwise import sliding_window_attention
from tests.helpers import (F32_ATOL, attention_ops, check, compare, gdn_inputs, kernel_case_id, kernel_inputs,
                           rng_for)

TILE128_CASE = (1, 300, 4, 2, 32, 128, "varlen")  # B, T, N, K, H, tile, layout: T = 300 padded to three tiles


@pytest.mark.parametrize("pallas_target", ["mosaic_tpu"], indirect=True)
@pytest.mark.parametrize("name,kw", [("moba", dict(chunk_size=64, topk=3)), ("swa", dict(window=130))],
                         ids=[kernel_case_id(TILE128_CASE, C=64, top=3), kernel_case_id(TILE128_CASE, W=130)])
def test_tpu_kernels_with_the_tile_a_tpu_takes(name, kw, pallas_target):
    """The 128-token tile the TPU kernels need on hardware (the other cases use 16/32 to stay fast in interpret
    mode): T = 300 padded to three tiles, GQA 2:1 with two kv heads, forward and gradients vs the XLA path."""
    inputs, seg = kernel_inputs(TILE128_CASE)
    compare(f"pallas-tpu-tile128-{name}", *attention_ops(name, seg, 128, pallas_target, **kw), inputs, jnp.float32)


@pytest.mark.parametrize("kernel", ["moba-gathered", "moba-union", "swa", "gdn"])
def test_tpu_kernels_under_the_tpu_simulator(kernel):
    """jax's TPU interpret mode (``pltpu.InterpretParams``) simulates the chip more closely than plain interpret
    mode: two cores splitting the "parallel" grid dimensions in a randomised order, a race detector,
    uninitialised memory filled with NaN, out-of-bounds reads and non-consecutive revisits of an output block
    raising. MoBA (both algorithms: the gathered default, whose dK/dV work list must revisit each output tile only
    consecutively, and union) and SWA (forward + gradients) at the 128-token tile, GQA 2:1 with two kv heads,
    against the XLA path, and the GDN forward (segments inside chunks, a length-1 run) against the GPU-style kernel (float32
    1e-4); no race found. (Declaring the list dimension, or GDN's chunk dimension, "parallel" makes the MoBA,
    resp. GDN, case fail: checked.)"""
    sim = pltpu.InterpretParams(detect_races=True, num_cores_or_threads=2, random_seed=0)
    interpret_pallas_call.reset_tpu_interpret_mode_state()
    if kernel == "gdn":  # chunks sequential, heads split over the two cores; the GPU-style kernel == XLA path
        B, T, N, H, C = 2, 256, 2, 32, 64
        q, k, v, g, beta, s0 = (jnp.asarray(x) for x in gdn_inputs(rng_for("pallas-gdn-sim"), B, T, N, H, H, 1.0,
                                                                         True))
        unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731  prepared as by the ops
        q, k = unit(q) * H ** -0.5, unit(k)
        runs = jnp.asarray([[0] * 90 + [1] * 166, [0] * 64 + [1] * 1 + [2] * 191], jnp.int32)
        before = jnp.asarray([[0, 0, 1, 1], [0, 0, 2, 2]], jnp.int32)  # the run owning each chunk's incoming state
        args = (q, k, v, g, beta, runs, before, s0)
        want = gated_delta_rule_fwd(*args, chunk_size=C, interpret=True, target="triton")
        got = gated_delta_rule_fwd(*args, chunk_size=C, interpret=sim, target="mosaic_tpu")
        for name, a, e in zip(("o", "state"), got, want):
            check(f"gdn {name} under the TPU simulator", a, e, 1e-4, F32_ATOL)
    else:
        inputs, seg = kernel_inputs(TILE128_CASE)
        labels, pos = segment_labels(seg), segment_positions(seg)
        tile = BlockSizes(128)

        def moba(x):
            sel = moba_select_blocks(x["q"], x["k"], chunk_size=64, topk=3, segment_ids=seg)
            return (moba_flash_attention(x["q"], x["k"], x["v"], sel=sel, seg=labels, pos=pos, chunk_size=64,
                                         block_sizes=tile, interpret=sim, target="mosaic_tpu",
                                         algorithm=kernel.split("-")[1]),)

        def swa(x):
            return (sliding_window_flash_attention(x["q"], x["k"], x["v"], window=130, seg=labels, block_sizes=tile,
                                                   interpret=sim, target="mosaic_tpu"),)

        def moba_xla(x):
            return (moba_attention(x["q"], x["k"], x["v"], chunk_size=64, topk=3, segment_ids=seg, impl="xla"),)

        def swa_xla(x):
            return (sliding_window_attention(x["q"], x["k"], x["v"], window=130, segment_ids=seg, impl="xla"),)

        fast, ref = (moba, moba_xla) if kernel.startswith("moba") else (swa, swa_xla)
        compare(f"pallas-tpu-sim-{kernel}", fast, ref, inputs, jnp.float32)
    assert interpret_pallas_call.races is not None and not interpret_pallas_call.races.races_found
