"""One process of a two-process (multi-host) run of the sequence-sharded model forward, launched twice by
``tests/test_multihost.py``: ``python -m tests.mh_worker PROCESS_ID PORT OUT FIXTURE:SPEC...``.

Each process has 2 forced CPU devices (set before jax is imported), joins the localhost coordinator at ``PORT``
with gloo CPU collectives, and for every ``FIXTURE:SPEC`` builds ``make_mesh(SPEC)`` over the 4 global devices,
loads the fixture with ``load_pretrained(..., mesh=mesh)`` (each process places only its own shards) and runs the
forward on the fixture's inputs, every process passing the same full batch. The logits are a global array that no
process holds whole; ``process_allgather`` assembles them on every process, and process 0 writes them to
``OUT/<FIXTURE>-<SPEC>.npy`` for the parent test to compare with its own 1-device forward. The last stdout line
is one JSON object ``{"process": id, "processes": n, "devices": global, "local_devices": local,
"cases": {case: [shape...]}}``.
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2").strip()

import json  # noqa: E402
import sys  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

import spb2_jax as spb2  # noqa: E402
from spb2_jax.parallel import initialize_distributed, make_mesh  # noqa: E402
from tests.helpers import fixture_dir  # noqa: E402

NUM_PROCESSES = 2


def run(process_id: int, port: int, out: Path, pairs: list[str]) -> dict:
    initialize_distributed(f"localhost:{port}", NUM_PROCESSES, process_id, cpu_collectives="gloo")
    cases = {}
    for pair in pairs:
        name, spec = pair.split(":", 1)
        inputs = np.load(fixture_dir(name) / "inputs.npz")
        mask = inputs["attention_mask"] if "attention_mask" in inputs else None
        mesh = make_mesh(spec)
        model = spb2.load_pretrained(fixture_dir(name), mesh=mesh)
        logits = model(inputs["input_ids"], mask).logits
        assert not logits.is_fully_addressable  # the forward really spans both processes
        full = multihost_utils.process_allgather(logits, tiled=True)  # [B, T, V] on every process
        if process_id == 0:
            np.save(out / f"{name}-{spec}.npy", full)
        cases[f"{name}-{spec}"] = list(full.shape)
    return {"process": jax.process_index(), "processes": jax.process_count(), "devices": jax.device_count(),
            "local_devices": jax.local_device_count(), "cases": cases}


if __name__ == "__main__":
    pid, port_arg, out_dir, *fixture_specs = sys.argv[1:]
    try:
        report = run(int(pid), int(port_arg), Path(out_dir), fixture_specs)
    except BaseException:
        # exit at once: a normal exit would wait in jax.distributed's shutdown barrier for the other process,
        # which is itself stuck waiting for this one in a collective
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    print(json.dumps(report))
