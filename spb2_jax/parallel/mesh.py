"""Device meshes with the axes ``data``, ``fsdp``, ``tensor``, ``sequence`` (``spb2_jax.parallel.rules``).

``make_mesh("data=2,fsdp=2,tensor=1,sequence=2")`` (or a dict) builds a ``jax.sharding.Mesh`` over all devices
(every process's, after ``jax.distributed.initialize``) with all four axes, the ones not named of size 1. The axis
types are ``AxisType.Auto``: the model's logical names are sharding *hints* (``nn.with_logical_constraint``) that
the compiler propagates, and the sequence-parallel mixers are ``jax.shard_map`` over ``sequence`` only; jax 0.10's
default ``Explicit`` axes would turn every hint into a type assertion on the operand's sharding.

Multi-host: call ``jax.distributed.initialize(...)`` in every process first (``initialize_distributed``); the
mesh then spans ``jax.devices()``, the devices of all processes. Every process then runs the same program:
``load_pretrained(path, mesh=mesh)`` on the same checkpoint and the model on the same full batch; each process
places only its own devices' shards, and the outputs are global arrays (gather them with
``jax.experimental.multihost_utils.process_allgather``). ``tests/test_multihost.py`` runs two processes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from spb2_jax.parallel.rules import MESH_AXES

BATCH_AXES = ("data", "fsdp")  # the mesh axes the batch is split over (rules: act_batch)
SEQUENCE_AXIS = "sequence"


def parse_mesh_spec(spec: str | Mapping[str, int]) -> dict[str, int]:
    """``"data=2,sequence=4"`` or ``{"data": 2, "sequence": 4}`` -> sizes of all four axes (absent: 1).

    Raises ``ValueError`` naming an unknown axis, a repeated axis, a malformed item or a size < 1."""
    if isinstance(spec, str):
        items = {}
        for part in filter(None, (p.strip() for p in spec.split(","))):
            name, sep, value = part.partition("=")
            name = name.strip()
            if not sep or not value.strip().lstrip("-").isdigit():
                raise ValueError(f"mesh spec item {part!r} must be 'axis=size' (e.g. 'data=2,sequence=4')")
            if name in items:
                raise ValueError(f"mesh axis {name!r} is given twice in {spec!r}")
            items[name] = int(value)
    elif isinstance(spec, Mapping):
        items = dict(spec)
    else:
        raise ValueError(f"mesh spec must be a string like 'data=2,sequence=4' or a dict, got {type(spec).__name__}")
    unknown = sorted(set(items) - set(MESH_AXES))
    if unknown:
        raise ValueError(f"unknown mesh axis {unknown[0]!r}; the axes are {list(MESH_AXES)}")
    sizes = {name: int(items.get(name, 1)) for name in MESH_AXES}
    bad = {k: v for k, v in sizes.items() if v < 1}
    if bad:
        raise ValueError(f"mesh axis sizes must be >= 1, got {bad}")
    return sizes


def make_mesh(spec: str | Mapping[str, int] = "", devices=None) -> Mesh:
    """A mesh with the axes ``MESH_AXES`` (``data, fsdp, tensor, sequence``), all ``AxisType.Auto``.

    Args:
      spec: axis sizes, ``"data=2,fsdp=2,tensor=1,sequence=2"`` or a dict; axes not named have size 1. Their
        product must equal the number of devices.
      devices: default ``jax.devices()`` (all processes' devices).
    Raises:
      ValueError: an unknown axis name, a size < 1, or sizes whose product is not the device count.
    """
    sizes = parse_mesh_spec(spec)
    devices = jax.devices() if devices is None else list(devices)
    shape = tuple(sizes[name] for name in MESH_AXES)
    if math.prod(shape) != len(devices):
        given = ", ".join(f"{k}={v}" for k, v in sizes.items())
        raise ValueError(f"mesh sizes {given} multiply to {math.prod(shape)}, but there are {len(devices)} devices")
    if devices == jax.devices():
        return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))
    return Mesh(np.asarray(devices, dtype=object).reshape(shape), MESH_AXES,
                axis_types=(AxisType.Auto,) * len(MESH_AXES))


def sequence_shards(mesh: Mesh | None) -> int:
    """Number of shards of the time axis (1 without a mesh)."""
    return 1 if mesh is None else int(dict(mesh.shape).get(SEQUENCE_AXIS, 1))


def batch_shards(mesh: Mesh | None) -> int:
    """Number of shards of the batch axis (``data`` x ``fsdp``; 1 without a mesh)."""
    return 1 if mesh is None else math.prod(int(dict(mesh.shape).get(a, 1)) for a in BATCH_AXES)


def token_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of ``[B, T]`` token arrays: batch over ``data, fsdp``, time over ``sequence``."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES, SEQUENCE_AXIS))


def check_batch(mesh: Mesh | None, batch: int) -> None:
    """``ValueError`` unless ``batch`` divides over the mesh's batch axes."""
    n = batch_shards(mesh)
    if batch % n:
        raise ValueError(f"batch size {batch} is not divisible by the mesh's data x fsdp = {n} shards")


def initialize_distributed(coordinator_address: str, num_processes: int, process_id: int, *,
                           cpu_collectives: str | None = None) -> None:
    """``jax.distributed.initialize`` for a multi-process run (call it first, in every process, before any
    other jax call).

    Args:
      coordinator_address: ``"host:port"`` of process 0, the same in every process.
      num_processes: the number of processes.
      process_id: this process's index in ``[0, num_processes)``.
      cpu_collectives: the cross-process collectives of the CPU backend, ``"gloo"`` or ``"mpi"``
        (``jax_cpu_collectives_implementation``); None keeps jax's default (gloo in jax 0.10).
    """
    if cpu_collectives is not None:
        jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id)
