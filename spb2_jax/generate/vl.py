"""Cached generation for SpB2.0-VL: a prompt with images is prefilled once (the vision tower runs there), then
text tokens are decoded over the caches. Positions follow the official model: the prompt's M-RoPE positions come
from ``get_rope_index``; a decoded token at row position ``p`` (its index among the row's real tokens) gets
``p + delta`` in all three channels, ``delta = (largest prompt position + 1) - prompt length`` per row (the
official ``rope_deltas`` counted on real tokens, so left padding does not shift it).
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from spb2_jax.generate.decode import check_attention_mask
from spb2_jax.generate.sampling import sample_token
from spb2_jax.layers.cache import Cache, CacheStep, init_cache
from spb2_jax.options import ModelOptions
from spb2_jax.vision.config import VLConfig
from spb2_jax.vl_model import SpB2VLForConditionalGeneration, prepare_vl_inputs


def _vl_extend(params, ids, valid, cache: Cache, pixels, vision, mrope, mrope_delta, *, config: VLConfig,
               options: ModelOptions, fresh: bool, all_logits: bool):
    step = CacheStep.after(cache.length, valid, fresh=fresh)
    logits, layers = SpB2VLForConditionalGeneration(config, options).apply(
        {"params": params}, ids, cache.layers, step, all_logits, pixel_values=pixels, vision=vision, mrope=mrope,
        mrope_delta=mrope_delta, method=SpB2VLForConditionalGeneration.extend)
    length = cache.length + step.valid.sum(axis=1, dtype=jnp.int32)
    return logits, Cache(layers=layers, length=length, max_len=cache.max_len)


vl_extend = jax.jit(_vl_extend, static_argnames=("config", "options", "fresh", "all_logits"))


def vl_prefill(params, config: VLConfig, input_ids, cache: Cache, attention_mask=None, *, pixel_values=None,
               image_grid_thw=None, options: ModelOptions, all_logits: bool = False):
    """Add a prompt with its images to an EMPTY ``cache`` (``init_cache(config.text, ...)``); returns
    ``(logits, cache, mrope_delta [B])`` — pass ``mrope_delta`` to every ``vl_decode_step``."""
    ids = np.asarray(input_ids)
    valid = check_attention_mask(attention_mask, ids.shape)
    if int(np.asarray(jax.device_get(cache.length)).max()) != 0:
        raise ValueError("vl_prefill needs an empty cache: a prompt with images is added in one piece")
    prep = prepare_vl_inputs(config, ids, valid.astype(np.int64), pixel_values=pixel_values,
                             image_grid_thw=image_grid_thw)
    mrope = prep["mrope"]
    top = np.where(valid, mrope.max(axis=-1), -1).max(axis=1)  # [B] largest prompt position per row
    delta = (top + 1 - valid.sum(axis=1)).astype(np.int32)
    pixels = None if pixel_values is None else jnp.asarray(pixel_values, jnp.float32)
    logits, cache = vl_extend(params, jnp.asarray(ids, jnp.int32), jnp.asarray(valid), cache, pixels, prep["vision"],
                              jnp.asarray(mrope), None, config=config, options=options, fresh=True,
                              all_logits=all_logits)
    return logits, cache, jnp.asarray(delta)


def vl_decode_step(params, config: VLConfig, token_ids, cache: Cache, mrope_delta, *, options: ModelOptions):
    """Add one text token per row, ``token_ids [B, 1]``; returns ``(logits [B, 1, V], cache)``."""
    ids = jnp.asarray(token_ids, jnp.int32)
    return vl_extend(params, ids, jnp.ones(ids.shape, bool), cache, None, None, None, mrope_delta, config=config,
                     options=options, fresh=False, all_logits=True)


def generate_vl(params, config: VLConfig, input_ids, attention_mask=None, *, pixel_values=None,
                image_grid_thw=None, options: ModelOptions, max_new_tokens: int = 32, temperature: float = 0.0,
                top_k: int | None = None, top_p: float = 1.0, seed: int = 0,
                stop_tokens: Sequence[int] = ()) -> list[list[int]]:
    """Prefill the prompts with their images, then sample ``max_new_tokens`` (or until a stop token) per row;
    returns the new token ids of each row (stop token included)."""
    ids = np.asarray(input_ids)
    if ids.ndim == 1:
        ids = ids[None]
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
    B, T = ids.shape
    cache = init_cache(config.text, B, T + max_new_tokens, options.dtype)
    logits, cache, delta = vl_prefill(params, config, ids, cache, attention_mask, pixel_values=pixel_values,
                                      image_grid_thw=image_grid_thw, options=options)
    sample = functools.partial(sample_token, temperature=temperature, top_k=top_k, top_p=top_p)
    rng = jax.random.key(seed)
    out: list[list[int]] = [[] for _ in range(B)]
    done = np.zeros(B, bool)
    stops = set(int(s) for s in stop_tokens)
    for i in range(max_new_tokens):
        rng, key = jax.random.split(rng)
        token = np.asarray(sample(logits[:, -1], key))
        for b in range(B):
            if not done[b]:
                out[b].append(int(token[b]))
                done[b] = int(token[b]) in stops
        if done.all() or i == max_new_tokens - 1:
            break
        logits, cache = vl_decode_step(params, config, token[:, None], cache, delta, options=options)
    return out
