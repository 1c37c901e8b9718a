"""Which lowering a kernel targets and the compiler parameters it needs.

Every kernel here exists in two forms: GPU style (``"triton"``: the grid runs over output tiles and a loop inside
the kernel walks the work, as jax's ``pallas/ops/gpu`` kernels) and TPU style (``"mosaic_tpu"``: the work list is
a grid dimension, scalar-prefetched indices pick the blocks the pipeline copies into VMEM, accumulators live in
VMEM scratch, as jax's ``pallas/ops/tpu`` kernels). The caller picks the target and interpret mode (the public
wrappers take both as required keywords; nothing in ``pallas_kernels`` looks at the backend); both forms run on
CPU with ``interpret=True`` (tests compare each with the XLA path).
"""

from __future__ import annotations

from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

TARGETS = ("triton", "mosaic_tpu")


def check_target(target: str) -> str:
    """``target`` if it is one of ``TARGETS``, else a ValueError naming it."""
    if target not in TARGETS:
        raise ValueError(f"target={target!r} must be one of {TARGETS}")
    return target


def triton_params(interpret: bool, *, num_warps: int = 4, num_stages: int = 2):
    """Triton compiler params (jax >= 0.8 otherwise lowers ``pallas_call`` on NVIDIA through Mosaic GPU, which the
    GPU-style kernels are not written for); None in interpret mode."""
    if interpret:
        return None
    return pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def tpu_params(interpret, dimension_semantics: tuple[str, ...]):
    """Mosaic TPU compiler params: which grid dimensions are independent (``"parallel"``: megacore may split them)
    and which carry an accumulator from step to step (``"arbitrary"``). Also given in interpret mode: jax's TPU
    simulator (``interpret=pltpu.InterpretParams(...)``) splits and shuffles the parallel dimensions by them."""
    del interpret
    return pltpu.CompilerParams(dimension_semantics=dimension_semantics)


def check_smem(need: int, what: str, interpret) -> None:
    """On a TPU, a ValueError naming ``what`` and the sizes when ``need`` bytes of scalar-prefetched operands alone
    exceed the chip's SMEM (a lower bound of what the kernel needs), instead of a Mosaic allocation error. Nothing
    to compare with in interpret mode or when lowering for TPU elsewhere."""
    if interpret:
        return
    try:
        capacity = pltpu.get_tpu_info().smem_capacity_bytes
    except ValueError:  # not running on a TPU
        return
    if need > capacity:
        raise ValueError(f"the TPU kernel's {what} need {need:,} bytes of SMEM, more than the chip's {capacity:,}; "
                         f"use a longer tile (block_size), fewer heads per call, or impl='xla'")
