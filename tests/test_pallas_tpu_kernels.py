"""The TPU-style kernels (``target="mosaic_tpu"``: scalar-prefetched lists driving the grid, VMEM accumulators)
run in interpret mode on CPU through the same ``spb2_jax.ops`` entry points and the same checks as the GPU-style
kernels in ``test_pallas_kernels`` (forward AND gradients vs the XLA path, float32 1e-4; bf16 with the bound
derived there). The fixture makes ``"mosaic_tpu"`` the default target and asserts that only TPU-style kernels ran.
"""

from __future__ import annotations

import jax.numpy as jnp
import pytest
from jax.experimental import pallas as pl

import pallas_kernels.platform
from tests import test_pallas_kernels as gpu_style
from tests.test_ops_fast import compare
from tests.test_pallas_kernels import (ATTN_CASES, BF16_CASES, DEFAULT, GDN_CASES, GDN_IDS, MOBA_CASES, SWA_GRID,
                                       _attn_id, _attn_inputs, _ops, params)


@pytest.fixture
def tpu_style(monkeypatch):
    """Default target -> ``"mosaic_tpu"``; records every ``pallas_call`` name and checks they are TPU kernels."""
    names = []
    real = pl.pallas_call

    def recording(*args, **kwargs):
        names.append(kwargs.get("name"))
        return real(*args, **kwargs)

    monkeypatch.setattr(pallas_kernels.platform, "default_target", lambda: "mosaic_tpu")
    monkeypatch.setattr(pl, "pallas_call", recording)
    yield
    assert names and all(n.endswith("_tpu") for n in names), names


@pytest.mark.parametrize("case,window", params(SWA_GRID, [f"{_attn_id(c)}-w{w}" for c, w in SWA_GRID],
                                               lambda i: i.startswith("B2-T50") and i.endswith("w7")))
def test_sliding_window_kernel_tpu(tpu_style, case, window):
    gpu_style.test_sliding_window_kernel(case, window)


@pytest.mark.parametrize("case,C,topk", params(MOBA_CASES, [f"{_attn_id(c)}-C{C}-top{k}" for c, C, k in MOBA_CASES],
                                                lambda i: i.rsplit("-", 2)[0] in DEFAULT and i.endswith("C8-top3")))
def test_moba_kernel_tpu(tpu_style, case, C, topk):
    gpu_style.test_moba_kernel(case, C, topk)


@pytest.mark.parametrize("case", ATTN_CASES[1:3], ids=_attn_id)
@pytest.mark.slow
def test_moba_kernel_topk_covering_all_blocks_is_dense_causal_tpu(tpu_style, case):
    gpu_style.test_moba_kernel_topk_covering_all_blocks_is_dense_causal(case)


@pytest.mark.parametrize("case", params([(c,) for c in ATTN_CASES], map(_attn_id, ATTN_CASES),
                                        lambda i: i.endswith("short")))
def test_causal_kernel_tpu(tpu_style, case):
    gpu_style.test_causal_kernel(case)


@pytest.mark.parametrize("name,kw,spec", params(BF16_CASES, [c[0] for c in BF16_CASES], lambda i: i == "moba"))
def test_attention_kernels_bf16_tpu(tpu_style, name, kw, spec):
    gpu_style.test_attention_kernels_bf16(name, kw, spec)


@pytest.mark.parametrize("case", params([(c,) for c in GDN_CASES], GDN_IDS, lambda i: i.endswith("varlen")))
def test_gated_delta_rule_kernel_tpu(tpu_style, case):
    gpu_style.test_gated_delta_rule_kernel(case)


@pytest.mark.parametrize("name,kw", [("moba", dict(chunk_size=64, topk=3)), ("swa", dict(window=130))],
                         ids=["moba-C64-top3", "swa-w130"])
def test_tpu_kernels_with_the_tile_a_tpu_takes(tpu_style, name, kw):
    """The 128-token tile the TPU kernels need on hardware (the other cases use 16/32 to stay fast in interpret
    mode): T = 300 padded to three tiles, GQA 2:1 with two kv heads, forward and gradients vs the XLA path."""
    case = (1, 300, 4, 2, 32, 128, "varlen")
    inputs, seg = _attn_inputs(case)
    compare(f"pallas-tpu-tile128-{name}", *_ops(name, seg, 128, **kw), inputs, jnp.float32, 1)
