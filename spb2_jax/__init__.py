"""spb2_jax: SpikingBrain2.0 (hybrid MoBA / SWA / SSE linear-attention LLM) in JAX/Flax."""

__version__ = "0.1.0"
