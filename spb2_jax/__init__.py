"""spb2_jax: SpikingBrain2.0 (hybrid MoBA / SWA / SSE linear-attention LLM) in JAX/Flax."""

from spb2_jax import _xla_cpu

_xla_cpu.apply()  # before any backend starts: see spb2_jax/_xla_cpu.py

__version__ = "0.1.0"
