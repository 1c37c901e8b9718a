"""Fixtures (the shared cases and helpers are in ``tests/helpers.py``)."""

from __future__ import annotations

import os

# The suite compiles hundreds of small XLA programs on a 2-core CI machine, where compile time dominates. LLVM -O0
# for XLA:CPU's generated code compiles them ~30% faster (measured on the generation tests) and leaves the HLO, and
# so the computation, unchanged. Only the test process and its subprocesses are affected, never the package.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()

import jax  # noqa: E402
import pytest  # noqa: E402
from jax.experimental import pallas as pl  # noqa: E402

from tests.helpers import FIXTURES, REPO, fixture_dir  # noqa: E402, F401  (re-exported: modules import them here)


@pytest.fixture(scope="module")
def fast_compiles():
    """Skips most XLA optimisation passes for a module of many small programs (``pytestmark =
    pytest.mark.usefixtures("fast_compiles")``): compile time dominates them, and the passes change nothing the
    comparisons look at. Restored afterwards."""
    old = jax.config.values["jax_disable_most_optimizations"]
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", old)


@pytest.fixture
def pallas_target(request, monkeypatch):
    """The Pallas target (``"triton"`` or ``"mosaic_tpu"``) a kernel test runs, parametrized with ``indirect=True``;
    records every ``pallas_call`` and checks at teardown that kernels of that target, and only those, ran
    (TPU-style kernels are named ``*_tpu``)."""
    names = []
    real = pl.pallas_call

    def recording(*args, **kwargs):
        names.append(kwargs.get("name"))
        return real(*args, **kwargs)

    monkeypatch.setattr(pl, "pallas_call", recording)
    yield request.param
    tpu = request.param == "mosaic_tpu"
    assert names and all(n.endswith("_tpu") == tpu for n in names), names


# Tests of the default selection that run 20-90 s on the 2-core CI machine (subprocesses with 8 forced devices or
# two jax.distributed processes, the README notebook, a program compiled with and without a fusion). They are
# started first: with pytest-xdist's load scheduling in collection order, they otherwise come last (these modules
# sort late) and one worker runs them alone while the other idles, ~2 minutes of a CI run.
LONG_FIRST = (
    "tests/test_sequence_parallel.py",
    "tests/test_multihost.py",
    "tests/test_parallel_hlo.py",
    "tests/test_readme.py::test_use_section_runs_as_written",
    "tests/test_xla_cpu_miscompile.py",
    "tests/test_generate.py::test_prefill_pieces_and_token_by_token_agree_float64",
    "tests/test_model_grad.py::test_directional_derivative_matches_central_difference_float64",
    "tests/test_train.py::test_four_microbatches_equal_one_batch",
    "tests/test_train.py::test_sharded_training_equals_one_device",
    "tests/test_train.py::test_resume_after_sigkill_is_bitwise",
    "tests/test_train.py::test_sigterm_saves_and_exits_cleanly",
    "tests/test_pallas_tpu_kernels.py::test_tpu_kernels_under_the_tpu_simulator",
)


def pytest_collection_modifyitems(config, items):
    """Moves the ``LONG_FIRST`` tests to the front, keeping the order within both groups (a stable sort)."""
    items.sort(key=lambda item: not item.nodeid.startswith(LONG_FIRST))
