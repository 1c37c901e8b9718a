"""Meshes and sequence parallelism: every sharded mixer and the sharded model equal their 1-device twins.

The multi-device checks run ``tests/sp_worker.py`` in a subprocess with 8 forced CPU devices (the device count
is fixed when jax starts). Bounds:
- model forward, float32: the contract's 1e-5 of the largest logit (measured ~1e-6: reassociation only);
- mixers (values and every input gradient) and model gradients, float64: TOL_X64 = 1e-12 relative. Both paths
  compute the same algebra in a different order (affine summaries composed across shards, a halo, an all-gather),
  so they agree to float64 rounding times the conditioning; a wrong summary, halo or segment cut is O(1). float64
  because in float32 the SSE router / gate gradients are ill-conditioned (tests/helpers.py: up to 1e7
  amplification), and two correct float32 orders differ there by up to 6e-5 of the leaf (measured).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from spb2_jax.parallel import MESH_AXES, make_mesh, parse_mesh_spec
from tests.helpers import FIXTURES, REPO, TOL_X64

SPECS = ("sequence=2", "sequence=4", "sequence=8", "data=2,sequence=4", "fsdp=2,sequence=4")
# default selection: every fixture once, every mesh spec at least once
DEFAULT_PAIRS = [f"{name}:{SPECS[i % len(SPECS)]}" for i, name in enumerate(FIXTURES)]
ALL_PAIRS = [f"{name}:{spec}" for name in FIXTURES for spec in SPECS]


def _worker(*args: str) -> dict:
    proc = subprocess.run([sys.executable, "-m", "tests.sp_worker", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=900, env=os.environ.copy())
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_make_mesh_has_the_four_axes_and_names_bad_specs():
    mesh = make_mesh()  # this process has one device
    assert mesh.axis_names == MESH_AXES and dict(mesh.shape) == dict.fromkeys(MESH_AXES, 1)
    assert parse_mesh_spec("data=2, sequence=4") == {"data": 2, "fsdp": 1, "tensor": 1, "sequence": 4}
    assert parse_mesh_spec({"fsdp": 2}) == {"data": 1, "fsdp": 2, "tensor": 1, "sequence": 1}
    for spec, message in (("data=2,pipe=2", "unknown mesh axis 'pipe'"), ("data", "must be 'axis=size'"),
                          ("data=2,data=2", "given twice"), ("sequence=0", ">= 1"),
                          ("sequence=2", "multiply to 2, but there are 1 devices")):
        with pytest.raises(ValueError, match=message):
            make_mesh(spec)


def test_bad_inputs_get_one_clear_error_each():
    errors = _worker("errors")
    assert errors["unknown_axis"].startswith("unknown mesh axis 'pipeline'")
    assert "multiply to 4, but there are 8 devices" in errors["wrong_product"]
    assert "must be 'axis=size'" in errors["malformed"]
    assert errors["batch_vs_data"] == "batch size 3 is not divisible by the mesh's data x fsdp = 2 shards"


def _check_ops(points):
    errors = _worker("ops", *points)
    assert len(errors) == 5 * sum(1 if p == "4:4" else 3 for p in points)  # 5 ops x the segmentations of a point
    bad = {case: err for case, err in errors.items() if not err <= TOL_X64}
    assert not bad, bad


def test_each_sequence_parallel_mixer_equals_its_one_device_twin():
    """GDN, GLA, SWA, MoBA and full attention, values and gradients, P = 4, 8 at T = 37 (no P divides it;
    P = 8: shards of 5 < the SWA window 7 and < 2 MoBA blocks) and T = P = 4; segment boundary at a shard
    boundary, a segment over >= 3 shards, a length-1 segment at a shard start, left / right / inner padding."""
    _check_ops(["4:37", "8:37", "4:4"])


def _check_forward(pairs):
    errors = _worker("forward", *pairs)
    assert len(errors) == len(pairs)
    bad = {case: err for case, err in errors.items() if not err <= 1e-5}
    assert not bad, bad


def _check_grads(pairs):
    errors = _worker("grads", *pairs)
    assert len(errors) == 2 * len(pairs)
    bad = {case: err for case, err in errors.items() if not err <= TOL_X64}
    assert not bad, bad


def test_sharded_forward_of_every_fixture_equals_one_device():
    _check_forward(DEFAULT_PAIRS)


def test_sharded_gradients_equal_one_device():
    """Loss and the gradient w.r.t. every parameter; tiny (MoBA, full, SSE-GDN + SWA) at T = 90 over 4 shards
    (padded to 92) with FSDP-sharded parameters."""
    _check_grads(["tiny:fsdp=2,sequence=4"])


def _check_decode(pairs):
    errors = _worker("decode", *pairs)
    assert len(errors) == len(pairs) + sum(p.endswith(":generate") for p in pairs)
    bad = {case: err for case, err in errors.items() if not err <= 1e-5}  # generate: mismatch 0.0
    assert not bad, bad


def test_cached_decode_after_a_sharded_prefill_equals_one_device():
    """Prefill of 85 tokens (not a multiple of the shard counts) into a KV cache sharded over ``sequence`` (the
    worker asserts the sharding), then teacher-forced decode steps combining the shards' partial softmax by
    log-sum-exp; every real token's logits vs the 1-device no-cache forward; ``Model.generate`` under the mesh
    gives the 1-device greedy tokens. MoBA + full + SSE-GDN (tiny), GLA with the mask form (tiny-gla-mask); left
    padding with a data axis in the slow test. Without the log-sum-exp rescaling the error is ~0.5 (checked)."""
    _check_decode(["tiny:sequence=4:generate", "tiny-gla-mask:sequence=8"])


@pytest.mark.slow(reason="every fixture x every mesh spec (the default selection covers each once)")
def test_sharded_forward_full_matrix():
    _check_forward(ALL_PAIRS)


@pytest.mark.slow(reason="gradients for every fixture x every mesh spec (the default selection: tiny, one spec)")
def test_sharded_gradients_full_matrix():
    _check_grads(ALL_PAIRS)


@pytest.mark.slow(reason="the mixers at P = 2 (the default selection: P = 4, 8 and T = P)")
def test_each_sequence_parallel_mixer_at_two_shards():
    _check_ops(["2:37"])


@pytest.mark.slow(reason="decode and generate for left padding under data=2,sequence=4 (default: tiny, tiny-gla-mask)")
def test_cached_decode_left_padding_with_a_data_axis():
    _check_decode(["tiny-leftpad:data=2,sequence=4:generate", "tiny-gla-mask:fsdp=2,sequence=4:generate"])


def test_vl_model_on_a_mesh_equals_one_device():
    """SpB2.0-VL loaded onto a data=2, tensor=2, sequence=2 mesh (vision tower replicated, text stack by the
    rules, sequence-parallel over ``sequence``; a two-row left-padded batch with one image per row and T = 70 not a multiple of the shards)
    gives the 1-device logits (float32; max error relative to the largest logit)."""
    result = _worker("vl", "data=2,tensor=2,sequence=2")
    for spec, err in result.items():
        assert err < 1e-5, (spec, err)
