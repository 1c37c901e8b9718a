"""Prefill and decode steps over a ``Cache``: the model's own modules, exactly equal to the no-cache forward.

``prefill`` adds a prompt (or a piece of one) to a cache and ``decode_step`` adds one token per row; both return
logits and the updated cache (the cache passed in is not modified: JAX arrays are immutable). The first piece
into an empty cache runs the forward's blockwise / chunked ops (linear memory in the piece length); later pieces
and decode steps attend over the cache (``spb2_jax.ops.cached_attention``).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from spb2_jax.config import SpB2Config
from spb2_jax.layers.cache import Cache, CacheStep
from spb2_jax.layers.common import Dtype
from spb2_jax.model import SpB2ForCausalLM
from spb2_jax.options import MOBA_DECODE, ModelOptions, options_from


def _extend(params: Any, input_ids: jax.Array, valid: jax.Array, cache: Cache, *, config: SpB2Config,
            fresh: bool, all_logits: bool, decoding: bool = False,
            options: ModelOptions = ModelOptions()) -> tuple[jax.Array, Cache]:
    """Add ``input_ids [B, T]`` (real where ``valid``) to ``cache``; jit-compiled, no host checks.

    ``fresh`` must be True only when every row of the cache is empty. ``decoding``: a decode step, where the
    options' ``moba_decode`` / ``official_rope_offset`` apply (see ``CacheStep``).
    """
    step = CacheStep.after(cache.length, valid, fresh=fresh,
                           moba_dense=decoding and options.moba_decode == "dense",
                           rope_offset=int(decoding and options.official_rope_offset))
    model = SpB2ForCausalLM(config, options)
    logits, layers = model.apply({"params": params}, input_ids, cache.layers, step, all_logits,
                                 method=SpB2ForCausalLM.extend)
    length = cache.length + step.valid.sum(axis=1, dtype=jnp.int32)
    return logits, Cache(layers=layers, length=length, max_len=cache.max_len)


_STATIC = ("config", "fresh", "all_logits", "decoding", "options")
extend = jax.jit(_extend, static_argnames=_STATIC)
# The same, updating the cache's buffers in place: the cache passed in is consumed (its arrays are deleted).
# Without donation every call copies the whole cache (O(max_len) per decoded token).
extend_in_place = jax.jit(_extend, static_argnames=_STATIC, donate_argnames=("cache",))


def _check_ids(input_ids: Any, cache: Cache, what: str) -> jax.Array:
    ids = jnp.asarray(input_ids)
    if ids.ndim != 2 or not jnp.issubdtype(ids.dtype, jnp.integer):
        raise ValueError(f"{what} must be an integer array [batch, tokens], got shape {ids.shape} dtype {ids.dtype}")
    if ids.shape[0] != cache.batch_size:
        raise ValueError(f"{what} has batch {ids.shape[0]} but the cache was made for batch {cache.batch_size}")
    return ids.astype(jnp.int32)


def check_token_ids(ids: Any, vocab_size: int, what: str) -> None:
    """Host check that token ids lie in ``[0, vocab_size)`` (the embedding lookup would clamp others silently)."""
    ids = np.asarray(ids)
    bad = ids[(ids < 0) | (ids >= vocab_size)]
    if bad.size:
        raise ValueError(f"{what} contain ids {sorted(set(bad.tolist()))[:8]} outside [0, vocab_size={vocab_size})")


def check_attention_mask(attention_mask: Any, shape: tuple[int, int]) -> np.ndarray:
    """Host-side ``[B, T]`` bool validity mask: 1 = real token. Each row's real tokens must be one contiguous
    run (left or right padding); a hole would split the row into two sequences."""
    if attention_mask is None:
        return np.ones(shape, bool)
    mask = np.asarray(attention_mask)
    if mask.shape != shape:
        raise ValueError(f"attention_mask shape {mask.shape} != input_ids shape {shape}")
    mask = mask != 0
    starts = mask & ~np.concatenate([np.zeros((shape[0], 1), bool), mask[:, :-1]], axis=1)
    bad = np.nonzero(starts.sum(axis=1) > 1)[0]
    if bad.size:
        raise ValueError(f"attention_mask rows {bad.tolist()} have padding between real tokens; only left or right "
                         "padding is supported")
    return mask


def prefill(params: Any, config: SpB2Config, input_ids: Any, cache: Cache, attention_mask: Any = None, *,
            all_logits: bool = False, donate_cache: bool = False, options: ModelOptions | None = None,
            impl: str | None = None, dtype: Dtype | None = None) -> tuple[jax.Array, Cache]:
    """Add a prompt, or the next piece of one, to ``cache``.

    Args:
      params: model params; config: its ``SpB2Config``.
      input_ids: ``[B, T]`` token ids; attention_mask: optional ``[B, T]`` 0/1 (0 = padding: the token is skipped,
        left padding for prompts of different lengths).
      cache: from ``init_cache`` or a previous ``prefill`` / ``decode_step``.
      all_logits: return ``[B, T, V]`` logits of every token; default ``[B, 1, V]`` of each row's last real token
        of this piece (all a sampler needs; avoids a ``T x vocab`` array for long prompts).
      donate_cache: update the cache's buffers in place; the ``cache`` passed in is consumed (its arrays are
        deleted). Default False: a new cache is returned and the old one stays usable (costs a copy of the cache).
      options: how the model runs (``spb2_jax.resolve_options``); or the old ``impl`` / ``dtype`` keywords.
    Returns:
      ``(logits, cache)``. Raises ``ValueError`` when a row would exceed the cache's ``max_len``.
    """
    options = options_from(options, config, impl=impl, dtype=dtype)
    ids = _check_ids(input_ids, cache, "input_ids")
    valid = check_attention_mask(attention_mask, ids.shape)
    check_token_ids(np.asarray(ids)[valid], config.vocab_size, "input_ids")
    length = np.asarray(jax.device_get(cache.length))
    new_length = length + valid.sum(axis=1)
    if (new_length > cache.max_len).any():
        rows = np.nonzero(new_length > cache.max_len)[0].tolist()
        raise ValueError(f"rows {rows} would hold {new_length[rows].tolist()} tokens, more than the cache's "
                         f"max_len={cache.max_len}; make the cache with a larger max_len")
    fn = extend_in_place if donate_cache else extend
    return fn(params, ids, jnp.asarray(valid), cache, config=config, fresh=bool((length == 0).all()),
              all_logits=all_logits, options=options)


def decode_step(params: Any, config: SpB2Config, token_ids: Any, cache: Cache, *, moba_decode: str | None = None,
                official_rope_offset: bool | None = None, donate_cache: bool = False,
                options: ModelOptions | None = None, impl: str | None = None,
                dtype: Dtype | None = None) -> tuple[jax.Array, Cache]:
    """Add one token per row, ``token_ids [B, 1]``; returns ``(logits [B, 1, V], cache)``.

    No host synchronisation (usable in a Python loop at full speed, compiled once per shape). The caller keeps
    each row below ``cache.max_len`` (tokens beyond it are not stored).

    Args:
      options: how the model runs (``spb2_jax.resolve_options``), including its decoding fields
        ``moba_decode`` and ``official_rope_offset``; or the old keywords below.
      moba_decode: ``"exact"`` (default: the forward's per-token block selection) or ``"dense"`` (the official
        cached path: MoBA layers attend to the whole cache).
      official_rope_offset: reproduce the official cache's RoPE quirk (layers >= 1 rotate the new token at
        position + 1). With ``moba_decode="dense"`` this is the official cached decode.
      donate_cache: update the cache in place (the ``cache`` passed in is consumed). Without it each step copies
        the whole cache, ``O(max_len)`` per token; in a decode loop write
        ``logits, cache = decode_step(..., cache, donate_cache=True)``.
    """
    if moba_decode is not None and moba_decode not in MOBA_DECODE:
        raise ValueError(f"moba_decode={moba_decode!r} must be one of {MOBA_DECODE}")
    options = options_from(options, config, impl=impl, dtype=dtype, moba_decode=moba_decode,
                           official_rope_offset=official_rope_offset)
    ids = _check_ids(token_ids, cache, "token_ids")
    if ids.shape[1] != 1:
        raise ValueError(f"decode_step takes one token per row, token_ids shape {ids.shape}; use prefill for more")
    fn = extend_in_place if donate_cache else extend
    return fn(params, ids, jnp.ones(ids.shape, bool), cache, config=config, fresh=False, all_logits=True,
              decoding=True, options=options)
