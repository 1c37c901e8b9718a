"""Work around an XLA:CPU miscompilation in the jaxlib versions we support (found with jax 0.10.2).

XLA:CPU hands some fused dot + reduce subgraphs to YNNPACK (``__ynn_fusion``). For the intra-chunk products of
``spb2_jax.ops.gla_chunked`` (an einsum over ``[C, C, K]`` decays feeding a second dot) the fused kernel returns
garbage that changes from run to run (values up to 1e35) under ``jax.jit``, while the same ops run eagerly are
correct. ``--xla_cpu_experimental_ynn_fusion_type=`` (an empty list) turns these fusions off and restores exact
results; it does not touch GPU / TPU compilation.

XLA reads ``XLA_FLAGS`` once, when the first backend starts. ``apply()`` runs when ``spb2_jax`` is imported: it
appends the flag unless the user already set that flag (any value) or ``SPB2_JAX_KEEP_XLA_FLAGS=1``; when a
backend is already running it only warns, because the flag can no longer take effect.
"""

from __future__ import annotations

import os
import warnings

FLAG_NAME = "xla_cpu_experimental_ynn_fusion_type"
FLAG = f"--{FLAG_NAME}="


def _backends_started() -> bool:
    try:
        from jax._src import xla_bridge
        return bool(xla_bridge.backends_are_initialized())
    except (ImportError, AttributeError):  # jax internals moved: assume the worst (warn instead of silence)
        return True


def apply() -> bool:
    """Disable XLA:CPU YNNPACK fusions for this process if still possible. Returns True if the flag is active."""
    flags = os.environ.get("XLA_FLAGS", "")
    if FLAG_NAME in flags:
        return FLAG in flags.split()
    if os.environ.get("SPB2_JAX_KEEP_XLA_FLAGS", "") not in ("", "0"):
        return False
    if _backends_started():
        import jax
        if jax.default_backend() != "cpu":
            return False  # the miscompilation is CPU-only
        warnings.warn(
            f"spb2_jax was imported after JAX started its backends, so it could not add {FLAG} to XLA_FLAGS. "
            "XLA:CPU can then miscompile the chunked GLA path under jax.jit (wrong values). On CPU, import "
            f"spb2_jax before running any JAX computation, or start Python with XLA_FLAGS='{FLAG}'.",
            RuntimeWarning, stacklevel=3)
        return False
    os.environ["XLA_FLAGS"] = f"{flags} {FLAG}".strip()
    return True
