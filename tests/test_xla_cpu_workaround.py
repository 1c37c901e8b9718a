"""``spb2_jax._xla_cpu``: the XLA:CPU YNNPACK-fusion workaround is applied at import, and only when possible."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _run(code: str, **env) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "SPB2_JAX_KEEP_XLA_FLAGS")}
    full_env.update(env)
    return subprocess.run([sys.executable, "-W", "always", "-c", code], cwd=REPO, env=full_env,
                          capture_output=True, text=True, timeout=300)


SHOW = "import os, spb2_jax; print(repr(os.environ.get('XLA_FLAGS')))"


def test_flag_added_on_import():
    r = _run(SHOW)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == repr("--xla_cpu_experimental_ynn_fusion_type=")


def test_flag_appended_to_existing_flags():
    r = _run(SHOW, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    assert r.stdout.strip() == repr("--xla_force_host_platform_device_count=2 --xla_cpu_experimental_ynn_fusion_type=")


def test_user_value_and_opt_out_respected():
    r = _run(SHOW, XLA_FLAGS="--xla_cpu_experimental_ynn_fusion_type=dot")
    assert r.stdout.strip() == repr("--xla_cpu_experimental_ynn_fusion_type=dot")
    r = _run(SHOW, SPB2_JAX_KEEP_XLA_FLAGS="1")
    assert r.stdout.strip() == "None"


def test_warns_when_backend_already_started():
    r = _run("import jax, jax.numpy as jnp; jnp.ones(2).block_until_ready(); " + SHOW)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "None"
    assert "RuntimeWarning" in r.stderr and "XLA_FLAGS" in r.stderr
