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


LONG_T, LONG_N, LONG_K, LONG_H = 131_072, 32, 8, 128
SMEM_BYTES = 1 << 20  # SMEM of current TPU chips (v5e / v6e: 1 MiB); the kernels check the real one on a TPU


def _record_scalar_operands(monkeypatch):
    """Spy on ``pallas_call``: for every call, its name and the bytes of its scalar-prefetched (SMEM) operands."""
    from jax.experimental import pallas as pl

    real, calls = pl.pallas_call, []

    def recording(kernel, *args, **kwargs):
        call = real(kernel, *args, **kwargs)
        prefetch = getattr(kwargs.get("grid_spec"), "num_scalar_prefetch", 0)

        def run(*operands):
            calls.append((kwargs.get("name"), [x.size * x.dtype.itemsize for x in operands[:prefetch]]))
            return call(*operands)

        return run

    monkeypatch.setattr(pl, "pallas_call", recording)
    return calls


def _lower_long_moba(C, topk, T=LONG_T, algorithm="gathered"):
    """Forward + backward of MoBA on TPU at ``T`` tokens, 32 query / 8 kv heads (5B's), bf16, lowered (not run)."""
    seg = jnp.ones((1, T), jnp.int32)
    pos = jnp.arange(T, dtype=jnp.int32)[None]
    q = jax.ShapeDtypeStruct((1, T, LONG_N, LONG_H), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((1, T, LONG_K, LONG_H), jnp.bfloat16)

    def grads(q, k, v, sel):
        attend = lambda q, k, v: moba_flash_attention(  # noqa: E731
            q, k, v, sel=sel, seg=seg, pos=pos, chunk_size=C, block_sizes=BlockSizes(128), interpret=False,
            target="mosaic_tpu", algorithm=algorithm)
        return _with_grad(attend)(q, k, v)

    sel = jax.ShapeDtypeStruct((1, T, LONG_N, topk - 1), jnp.int32)
    return _lower_for_tpu(grads, q, kv, kv, sel)


@pytest.mark.parametrize("C,topk", [(512, 4), (4096, 12)], ids=["512-4", "4096-12"])
def test_gathered_moba_lowers_for_tpu_at_128k_within_smem(C, topk, monkeypatch):
    """The TPU gathered MoBA (forward, dQ, dK/dV of both parts) lowers at T = 131,072 with 32 query / 8 kv heads,
    with the SMEM check on against a 1 MiB chip (capacity faked: off a TPU it cannot be read). Its
    scalar-prefetched operands, recorded per ``pallas_call``, fit in 1 MiB, equal ``metadata_bytes`` for part B,
    and grow linearly in T (half of them at T = 65,536) — the union kernel's lists are ``(T / tile)^2`` and fail
    the same check."""
    from jax.experimental.pallas import tpu as pltpu

    from pallas_kernels.moba_gathered import row_capacity
    from pallas_kernels.moba_gathered_tpu import metadata_bytes

    monkeypatch.setattr(pltpu, "get_tpu_info", lambda: type("Info", (), {"smem_capacity_bytes": SMEM_BYTES})())
    calls = _record_scalar_operands(monkeypatch)
    text = _lower_long_moba(C, topk)
    names = ["block_sparse_flash_fwd_tpu", "moba_rows_fwd_tpu", "block_sparse_flash_dq_tpu",
             "block_sparse_flash_dkv_tpu", "moba_rows_dq_tpu", "moba_rows_dkv_tpu"]
    assert sorted(n for n, _ in calls) == sorted(names) and all(n in text for n in names)
    smem = {name: sum(sizes) for name, sizes in calls}
    assert max(smem.values()) <= SMEM_BYTES, smem
    nP = row_capacity(LONG_T, topk - 1, C, 128)  # row tiles per query head
    part_b = metadata_bytes(LONG_T, LONG_N // LONG_K, nP, C, 128)
    assert (smem["moba_rows_fwd_tpu"], smem["moba_rows_dkv_tpu"]) == (part_b["row_keys"], part_b["work_list"])
    calls.clear()
    _lower_long_moba(C, topk, T=LONG_T // 2)
    half = {name: sum(sizes) for name, sizes in calls}
    assert all(abs(half[n] / smem[n] - 0.5) < 0.01 for n in names), (half, smem)
    with pytest.raises(ValueError, match="need .* bytes of SMEM, more than the chip's 1,048,576"):
        _lower_long_moba(C, topk, algorithm="union")
