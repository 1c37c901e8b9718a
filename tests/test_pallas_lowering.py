"""The Pallas kernels lower for CUDA through Triton and for TPU through Mosaic (checked on CPU: lowering needs
neither device). Interpret mode, which the numeric tests use, accepts array operations and block shapes that the
real lowerings reject; this catches them without the hardware. What it cannot check: the device compilers behind
the lowering (ptxas / Triton passes, libtpu's Mosaic passes) and run time."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels.block_sparse_flash import BlockSizes
from pallas_kernels.gated_delta_rule import gated_delta_rule_fwd
from pallas_kernels.moba import moba_flash_attention
from pallas_kernels.sliding_window import sliding_window_flash_attention

B, T, N, K, D = 1, 200, 4, 2, 64  # T not a multiple of the tile, GQA 2:1


def _lower_for_cuda(fn, *args) -> str:
    text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert "__gpu$xla.gpu.triton" in text  # Triton, not Mosaic GPU
    return text


def _qkv(dtype):
    ks = jax.random.split(jax.random.key(0), 3)
    return (jax.random.normal(ks[0], (B, T, N, D), dtype), jax.random.normal(ks[1], (B, T, K, D), dtype),
            jax.random.normal(ks[2], (B, T, K, D), dtype))


def _lower_for_tpu(fn, *args) -> str:
    text = jax.jit(fn).trace(*args).lower(lowering_platforms=("tpu",)).as_text()
    assert "tpu_custom_call" in text  # a Mosaic kernel
    return text


def _with_grad(attend):
    """Forward and backward kernels: the VJP of sum(o)."""
    return lambda q, k, v: jax.grad(lambda *a: attend(*a).astype(jnp.float32).sum(), argnums=(0, 1, 2))(q, k, v)


@pytest.mark.parametrize("algorithm", ["gathered", "union"])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32], ids=["bf16", "f32"])
def test_moba_kernel_lowers_to_triton(dtype, algorithm):
    seg = jnp.ones((B, T), jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    sel = jnp.full((B, T, N, 3), -1, jnp.int32)  # topk 4: three earlier blocks (padded to 4 columns for union)
    attend = lambda q, k, v: moba_flash_attention(q, k, v, sel=sel, seg=seg, pos=pos, chunk_size=64,  # noqa: E731
                                                  interpret=False, target="triton", algorithm=algorithm)
    text = _lower_for_cuda(_with_grad(attend), *_qkv(dtype))
    names = ("moba_rows_fwd", "moba_rows_dq", "moba_rows_dkv")
    assert all((name in text) == (algorithm == "gathered") for name in names)


def test_sliding_window_kernel_lowers_to_triton():
    seg = jnp.ones((B, T), jnp.int32)
    attend = lambda q, k, v: sliding_window_flash_attention(q, k, v, window=48, seg=seg,  # noqa: E731
                                                            interpret=False, target="triton")
    _lower_for_cuda(_with_grad(attend), *_qkv(jnp.bfloat16))


def test_gated_delta_rule_kernel_lowers_to_triton():
    H, C, Tc = 2, 64, 256
    ks = jax.random.split(jax.random.key(1), 3)
    q, k = (jax.random.normal(x, (B, Tc, H, D)) for x in ks[:2])
    v = jax.random.normal(ks[2], (B, Tc, H, D))
    g, beta = -jnp.ones((B, Tc, H)) * 0.1, jnp.full((B, Tc, H), 0.5)
    runs = jnp.zeros((B, Tc), jnp.int32)
    before = jnp.zeros((B, Tc // C), jnp.int32)
    S0 = jnp.zeros((B, H, D, D))
    _lower_for_cuda(lambda *a: gated_delta_rule_fwd(*a, chunk_size=C, interpret=False, target="triton"),
                    q, k, v, g, beta, runs, before, S0)


def test_block_sparse_core_rejects_a_partial_tile():
    from pallas_kernels.block_sparse_flash import MaskSpec, block_sparse_attention

    q = jnp.zeros((1, 20, 2, 16))
    meta = (jnp.zeros((1, 2, 2, 2), jnp.int32),) * 4 + (jnp.ones((1, 20), jnp.int32),) * 2 + (
        jnp.full((1, 20, 2, 1), -1, jnp.int32),)
    with pytest.raises(ValueError, match="T % block == 0, got T=20 block=16"):
        block_sparse_attention(q, q, q, meta, MaskSpec(), 0.25, 16, interpret=True, target="triton")


# ----------------------------------------------------------------------------------------------- Mosaic TPU
TPU_T = 384  # three 128-token tiles


def _tpu_qkv(dtype):
    ks = jax.random.split(jax.random.key(2), 3)
    return (jax.random.normal(ks[0], (B, TPU_T, N, D), dtype), jax.random.normal(ks[1], (B, TPU_T, K, D), dtype),
            jax.random.normal(ks[2], (B, TPU_T, K, D), dtype))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32], ids=["bf16", "f32"])
def test_moba_kernel_lowers_to_mosaic_tpu(dtype):
    seg = jnp.ones((B, TPU_T), jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(TPU_T, dtype=jnp.int32), (B, TPU_T))
    sel = jnp.full((B, TPU_T, N, 3), -1, jnp.int32)
    attend = lambda q, k, v: moba_flash_attention(q, k, v, sel=sel, seg=seg, pos=pos, chunk_size=128,  # noqa: E731
                                                  interpret=False, target="mosaic_tpu")
    text = _lower_for_tpu(_with_grad(attend), *_tpu_qkv(dtype))
    assert text.count("tpu_custom_call") >= 3  # forward, dQ, dK/dV


def test_sliding_window_kernel_lowers_to_mosaic_tpu():
    seg = jnp.ones((B, TPU_T), jnp.int32)
    attend = lambda q, k, v: sliding_window_flash_attention(q, k, v, window=128, seg=seg,  # noqa: E731
                                                            interpret=False, target="mosaic_tpu")
    _lower_for_tpu(_with_grad(attend), *_tpu_qkv(jnp.bfloat16))


def test_gated_delta_rule_kernel_lowers_to_mosaic_tpu():
    H, C, Tc, Dk = 2, 64, 256, 128
    ks = jax.random.split(jax.random.key(3), 3)
    q, k = (jax.random.normal(x, (B, Tc, H, Dk)) for x in ks[:2])
    v = jax.random.normal(ks[2], (B, Tc, H, Dk))
    g, beta = -jnp.ones((B, Tc, H)) * 0.1, jnp.full((B, Tc, H), 0.5)
    _lower_for_tpu(lambda *a: gated_delta_rule_fwd(*a, chunk_size=C, interpret=False, target="mosaic_tpu"),
                   q, k, v, g, beta, jnp.zeros((B, Tc), jnp.int32), jnp.zeros((B, Tc // C), jnp.int32),
                   jnp.zeros((B, H, Dk, Dk)))


def test_tpu_kernels_reject_a_tile_mosaic_cannot_block():
    """Key-side metadata rows ``[1, block]`` need ``block % 128 == 0`` (or the whole sequence) on TPU."""
    seg = jnp.ones((B, TPU_T), jnp.int32)
    q, k, v = _tpu_qkv(jnp.float32)
    with pytest.raises(ValueError, match="multiple of 128 or the whole sequence, got block=64"):
        sliding_window_flash_attention(q, k, v, window=8, seg=seg, block_sizes=BlockSizes(64), interpret=False,
                                       target="mosaic_tpu")


def test_tpu_kernels_name_the_smem_they_would_need(monkeypatch):
    """Whole tile lists go to SMEM by scalar prefetch; past the chip's capacity the error says so (capacity faked:
    the real one is read from the TPU). Lists (1, 4, 3, 4) + counts (1, 4, 3): 60 int32 = 240 bytes."""
    from jax.experimental.pallas import tpu as pltpu

    monkeypatch.setattr(pltpu, "get_tpu_info", lambda: type("Info", (), {"smem_capacity_bytes": 128})())
    seg = jnp.ones((B, TPU_T), jnp.int32)
    q, k, v = _tpu_qkv(jnp.float32)
    with pytest.raises(ValueError, match=r"tile lists \(1, 4, 3, 4\) need 240 bytes of SMEM, more than the chip's 128"):
        jax.jit(lambda q, k, v: sliding_window_flash_attention(
            q, k, v, window=TPU_T, seg=seg, interpret=False, target="mosaic_tpu")).trace(q, k, v).lower(
                lowering_platforms=("tpu",))


def test_wrappers_reject_an_unknown_target():
    """The caller names the target (no default by backend); a wrong name fails up front, naming it."""
    seg = jnp.ones((B, T), jnp.int32)
    q, k, v = _qkv(jnp.float32)
    with pytest.raises(ValueError, match=r"target='cuda' must be one of \('triton', 'mosaic_tpu'\)"):
        sliding_window_flash_attention(q, k, v, window=8, seg=seg, interpret=True, target="cuda")
    with pytest.raises(ValueError, match="target='tpu'"):
        moba_flash_attention(q, k, v, sel=jnp.full((B, T, N, 1), -1, jnp.int32), seg=seg, pos=jnp.zeros_like(seg),
                             chunk_size=64, interpret=True, target="tpu")


def test_pallas_kernels_depend_only_on_jax():
    """DESIGN.md: ``pallas_kernels`` depends only on jax (and the standard library)."""
    import ast
    import sys
    from pathlib import Path

    allowed = {"jax", "pallas_kernels"} | set(sys.stdlib_module_names)
    for path in sorted(Path(__file__).resolve().parents[1].glob("pallas_kernels/*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
            for name in names:
                assert name.split(".")[0] in allowed, f"{path.name} imports {name}"


def test_pallas_kernels_import_only_public_names_at_module_level():
    """No module of ``pallas_kernels`` imports inside a function (a lazy import hides an import cycle) or takes a
    private name from a sibling; ``_flash_common`` is the one shared-internals module they may import from."""
    import ast
    from pathlib import Path

    for path in sorted(Path(__file__).resolve().parents[1].glob("pallas_kernels/*.py")):
        tree = ast.parse(path.read_text())
        top = {id(node) for node in tree.body}
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            assert id(node) in top, f"{path.name}:{node.lineno} imports inside a function or block"
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pallas_kernels"):
                private = [a.name for a in node.names if a.name.startswith("_")]
                assert not private, f"{path.name} imports private {private} from {node.module}"
