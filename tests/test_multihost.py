"""Multi-host: the sequence-sharded forward run by two real processes equals the 1-device forward.

Two ``tests/mh_worker.py`` processes (2 forced CPU devices each) join one ``jax.distributed`` coordinator on a
free localhost port with gloo CPU collectives, so every mesh spans 4 devices of which each process holds 2. Per
case each process loads the fixture onto its own shards (``load_pretrained(..., mesh=)``), feeds the same full
batch, and the logits are gathered across processes. This proves what the 8-device single-process tests
(``tests/test_sequence_parallel.py``) cannot: parameter and input placement that each process does only for its
own devices, the sequence-parallel collectives (affine-summary prefix scan, SWA halo, MoBA / full-attention
all-gathers) crossing a process boundary, and outputs no single process holds. Bound: the contract's 1e-5 of the
largest logit in float32, as ``_check_forward`` there.

Cases: ``tiny-leftpad`` (GDN, MoBA, full attention, SWA; left padding via ``attention_mask``; T = 90 padded to 92)
over ``sequence=4`` (two shards per process); ``tiny-gla`` (GLA) over ``fsdp=2,sequence=2`` (batch and the
parameters' embedding dims split across the processes).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np

import spb2_jax as spb2
from tests.helpers import REPO, fixture_dir, free_port

PAIRS = ("tiny-leftpad:sequence=4", "tiny-gla:fsdp=2,sequence=2")
TIMEOUT_S = 300  # ~35 s when the machine is idle; generous because other test runs share its 2 cores


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def _reference(name: str) -> np.ndarray:
    inputs = np.load(fixture_dir(name) / "inputs.npz")
    mask = inputs["attention_mask"] if "attention_mask" in inputs else None
    return np.asarray(spb2.load_pretrained(fixture_dir(name))(inputs["input_ids"], mask).logits)


def test_two_process_sequence_sharded_forward_equals_one_device(tmp_path):
    port = free_port()
    logs = [(tmp_path / f"process{i}.out", tmp_path / f"process{i}.err") for i in range(2)]
    procs = []
    deadline = time.monotonic() + TIMEOUT_S
    try:
        for i, (out, err) in enumerate(logs):
            with open(out, "w") as fo, open(err, "w") as fe:
                procs.append(subprocess.Popen([sys.executable, "-m", "tests.mh_worker", str(i), str(port),
                                               str(tmp_path), *PAIRS], cwd=REPO, stdout=fo, stderr=fe,
                                              env=os.environ.copy()))
        refs = {name: _reference(name) for name in dict.fromkeys(pair.split(":")[0] for pair in PAIRS)}  # meanwhile
        # a process that fails leaves the other waiting in a collective: stop at the first failure
        while any(p.poll() is None for p in procs) and not any(p.poll() for p in procs):
            assert time.monotonic() < deadline, f"the workers ran past {TIMEOUT_S} s"
            time.sleep(0.2)
        codes = [p.poll() for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert codes == [0, 0], "\n".join(f"process {i}: {err.read_text()[-3000:]}" for i, (_, err) in enumerate(logs))

    reports = [json.loads(out.read_text().strip().splitlines()[-1]) for out, _ in logs]
    for i, report in enumerate(reports):
        assert (report["process"], report["processes"], report["devices"], report["local_devices"]) == (i, 2, 4, 2)
    assert reports[0]["cases"] == reports[1]["cases"]
    errors = {}
    for pair in PAIRS:
        name, spec = pair.split(":", 1)
        got = np.load(tmp_path / f"{name}-{spec}.npy")
        assert got.dtype == np.float32 and got.shape == refs[name].shape
        errors[pair] = _rel(got, refs[name])
    bad = {case: err for case, err in errors.items() if not err <= 1e-5}
    assert not bad, bad
