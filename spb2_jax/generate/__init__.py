"""Cached generation: ``init_cache``, ``prefill``, ``decode_step`` and the compiled sampling loop ``generate``.

``python -m spb2_jax.generate --checkpoint DIR --prompt "..."`` is the command-line front end.
"""

from spb2_jax.generate.decode import decode_step, prefill
from spb2_jax.generate.loop import GenerateOutput, bucket_length, generate
from spb2_jax.generate.sampling import filter_logits, sample_token
from spb2_jax.generate.tokenizer import TextStream, chat_prompt, encode_prompt, load_tokenizer, stop_token_ids
from spb2_jax.layers.cache import Cache, CacheStep, KVCache, SSECache, init_cache

__all__ = ["Cache", "CacheStep", "GenerateOutput", "KVCache", "SSECache", "bucket_length", "decode_step",
           "filter_logits", "generate", "init_cache", "prefill", "sample_token", "TextStream", "chat_prompt",
           "encode_prompt", "load_tokenizer", "stop_token_ids"]
