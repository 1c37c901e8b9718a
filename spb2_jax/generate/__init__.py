"""Cached generation: ``init_cache``, ``prefill``, ``decode_step`` and the compiled sampling loop ``generate``.

``python -m spb2_jax.generate --checkpoint DIR --prompt "..."`` is the command-line front end.
"""

from spb2_jax.generate.decode import decode_step, prefill
from spb2_jax.layers.cache import Cache, CacheStep, KVCache, SSECache, init_cache

__all__ = ["Cache", "CacheStep", "KVCache", "SSECache", "decode_step", "init_cache", "prefill"]
