"""``generate``: prefill plus the whole decode loop compiled once (``lax.while_loop``).

Prompts are left-padded to a length bucket (powers of two, at least ``MIN_BUCKET``) so that prompts of different
lengths in the same bucket reuse the compiled program. ``max_new_tokens`` is bucketed the same way (the loop stops
at the traced count), and the seed, temperature, top-p, stop tokens and pad id are traced, so changing them does not
recompile either.
"""

from __future__ import annotations

import dataclasses
import functools
import operator
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from spb2_jax.config import SpB2Config
from spb2_jax.generate.decode import check_attention_mask, check_token_ids, extend
from spb2_jax.generate.sampling import sample_token
from spb2_jax.layers.cache import init_cache
from spb2_jax.layers.common import Dtype
from spb2_jax.options import MOBA_DECODE, ModelOptions, options_from

MIN_BUCKET = 16
STOP_SLOTS = 8  # stop tokens are passed as an array padded to a multiple of this (-1 = unused slot)


@dataclasses.dataclass(frozen=True)
class GenerateOutput:
    """Result of ``generate`` (host numpy arrays).

    Attributes:
      tokens: ``[B, max_new_tokens]`` generated ids; after a row's stop token the rest is ``pad_token_id``.
      num_tokens: ``[B]`` generated tokens per row, the stop token included.
      prompt_lengths: ``[B]`` real prompt tokens per row.
    """

    tokens: np.ndarray
    num_tokens: np.ndarray
    prompt_lengths: np.ndarray

    def sequences(self) -> list[list[int]]:
        """Each row's generated ids up to and including its stop token."""
        return [row[:n].tolist() for row, n in zip(self.tokens, self.num_tokens)]


def bucket_length(n: int, minimum: int = MIN_BUCKET) -> int:
    """The padded prompt length for a prompt of ``n`` tokens: the next power of two >= max(n, minimum)."""
    return max(minimum, 1 << max(0, int(n) - 1).bit_length())


def left_pad(rows: Sequence[Sequence[int]], length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Left-pad token lists to ``[B, length]`` ids and the 0/1 mask."""
    ids = np.full((len(rows), length), pad_id, np.int32)
    mask = np.zeros((len(rows), length), bool)
    for i, row in enumerate(rows):
        if len(row):
            ids[i, length - len(row):] = row
            mask[i, length - len(row):] = True
    return ids, mask


def _prompt_rows(input_ids: Any, attention_mask: Any) -> list[list[int]]:
    """The real tokens of each prompt row (a list of lists, or ``[B, T]`` ids with an optional mask)."""
    if isinstance(input_ids, (list, tuple)) and input_ids and isinstance(input_ids[0], (list, tuple, np.ndarray)):
        if attention_mask is not None:
            raise ValueError("attention_mask is only for a padded [B, T] array; pass token lists unpadded")
        rows = [[int(t) for t in row] for row in input_ids]
    else:
        ids = np.asarray(input_ids)
        if ids.ndim == 1:
            ids = ids[None]
        if ids.ndim != 2:
            raise ValueError(f"input_ids must be [batch, tokens] or a list of token lists, got shape {ids.shape}")
        mask = check_attention_mask(attention_mask, ids.shape)
        rows = [ids[i][mask[i]].tolist() for i in range(ids.shape[0])]
    empty = [i for i, r in enumerate(rows) if not r]
    if not rows or empty:
        raise ValueError(f"every prompt needs at least one token; empty rows: {empty or 'no rows given'}")
    return rows


# The streaming target: one fixed host function is compiled into the loop, the user's callback is looked up here
# at run time, so a new callback does not recompile.
_STREAM: list[Callable[[int, np.ndarray], None] | None] = [None]


def _emit(step, tokens):
    target = _STREAM[0]
    if target is not None:
        target(int(step), np.asarray(tokens))


def _stop_array(stop_tokens: Sequence[int]) -> np.ndarray:
    n = -(-max(1, len(stop_tokens)) // STOP_SLOTS) * STOP_SLOTS
    stops = np.full((n,), -1, np.int32)
    stops[:len(stop_tokens)] = stop_tokens
    return stops


@functools.partial(jax.jit, static_argnames=("config", "capacity", "top_k", "options", "stream"))
def _generate(params, ids, valid, rng, temperature, top_p, stops, pad_token_id, max_new_tokens, *,
              config: SpB2Config, capacity: int, top_k: int | None, options: ModelOptions, stream: bool):
    """Prefill + sampling loop; ``capacity`` (static) >= the traced ``max_new_tokens`` sizes the output buffer."""
    B, T = ids.shape
    mesh = jax.sharding.get_abstract_mesh() if options.sequence_parallel else None  # KV cache over ``sequence``
    cache = init_cache(config, B, T + capacity, options.dtype, mesh=mesh)
    sample = functools.partial(sample_token, temperature=temperature, top_k=top_k, top_p=top_p)
    logits, cache = extend(params, ids, valid, cache, config=config, fresh=True, all_logits=False, options=options)
    rng, key = jax.random.split(rng)
    token = sample(logits[:, 0], key)
    done = jnp.isin(token, stops)
    out = jnp.full((B, capacity), pad_token_id, jnp.int32).at[:, 0].set(token)
    count = jnp.ones((B,), jnp.int32)
    if stream:
        jax.debug.callback(_emit, 0, token, ordered=True)

    def cond(carry):
        i, _, _, done, *_ = carry
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        i, token, cache, done, out, count, rng = carry
        logits, cache = extend(params, token[:, None], jnp.ones((B, 1), bool), cache, config=config, fresh=False,
                               all_logits=True, decoding=True, options=options)
        rng, key = jax.random.split(rng)
        token = jnp.where(done, pad_token_id, sample(logits[:, 0], key))
        out = out.at[:, i].set(token)
        count = count + (~done).astype(jnp.int32)
        done = done | jnp.isin(token, stops)
        if stream:
            jax.debug.callback(_emit, i, token, ordered=True)
        return i + 1, token, cache, done, out, count, rng

    carry = (jnp.int32(1), token, cache, done, out, count, rng)
    _, _, _, _, out, count, _ = jax.lax.while_loop(cond, body, carry)
    return out, count


def generate(
    params: Any,
    config: SpB2Config,
    input_ids: Any,
    attention_mask: Any = None,
    *,
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float = 1.0,
    seed: int = 0,
    stop_tokens: Sequence[int] | int | None = None,
    pad_token_id: int | None = None,
    moba_decode: str | None = None,
    official_rope_offset: bool | None = None,
    callback: Callable[[int, np.ndarray], None] | None = None,
    options: ModelOptions | None = None,
    impl: str | None = None,
    dtype: Dtype | None = None,
) -> GenerateOutput:
    """Generate up to ``max_new_tokens`` per prompt with the KV / recurrent-state cache.

    Args:
      params, config: the model.
      input_ids: ``[B, T]`` ids (with ``attention_mask`` for left/right padding) or a list of token lists.
      max_new_tokens: tokens to generate per row (the first comes from the prefill logits).
      temperature: 0 = greedy (default); > 0 samples from ``softmax(logits / temperature)``.
      top_k, top_p: optional top-k and nucleus filtering when sampling.
      seed: sampling seed (traced: no recompilation).
      stop_tokens: ids that end a row (included in its output); default ``config.eos_token_id``.
      pad_token_id: fills prompts' padding and rows after their stop; default ``config.pad_token_id`` or 0.
      moba_decode, official_rope_offset: ``decode_step``'s options; ``"dense"`` and True reproduce the official
        cached generation (which differs from the official no-cache forward).
      callback: ``callback(step, tokens [B])`` called on the host as each token is produced (streaming).
      options: how the model runs (``spb2_jax.resolve_options``: dtype, kernels, decoding); or the old keywords
        ``impl``, ``dtype``, ``moba_decode``, ``official_rope_offset``.
    Returns:
      ``GenerateOutput``. Prefill and the decode loop are one compiled program per (batch, prompt bucket,
      max_new_tokens bucket, top_k, options, callback or not).
    """
    try:
        max_new_tokens = operator.index(max_new_tokens)
    except TypeError:
        raise TypeError(f"max_new_tokens must be an int, got {max_new_tokens!r}") from None
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
    if temperature < 0:
        raise ValueError(f"temperature={temperature} must be >= 0 (0 = greedy)")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k={top_k} must be >= 1 (or None)")
    if moba_decode is not None and moba_decode not in MOBA_DECODE:
        raise ValueError(f"moba_decode={moba_decode!r} must be one of {MOBA_DECODE}")
    options = options_from(options, config, impl=impl, dtype=dtype, moba_decode=moba_decode,
                           official_rope_offset=official_rope_offset)
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p={top_p} must be in (0, 1]")
    rows = _prompt_rows(input_ids, attention_mask)
    if stop_tokens is None:
        stop_tokens = config.eos_token_id
    stops = () if stop_tokens is None else (stop_tokens,) if isinstance(stop_tokens, int) else tuple(stop_tokens)
    pad = pad_token_id if pad_token_id is not None else (config.pad_token_id or 0)
    for what, values in (("input_ids", [t for r in rows for t in r]), ("stop_tokens", stops),
                         ("pad_token_id", [pad])):
        check_token_ids(values, config.vocab_size, what)
    if callback is not None and _STREAM[0] is not None:
        raise RuntimeError("generate with a callback is already running (the streaming slot is process-wide); "
                           "call generate with callbacks one at a time")
    ids, valid = left_pad(rows, bucket_length(max(len(r) for r in rows)), pad)
    _STREAM[0] = callback
    try:
        out, count = _generate(params, jnp.asarray(ids), jnp.asarray(valid), jax.random.key(seed),
                               jnp.float32(temperature), jnp.float32(top_p),
                               jnp.asarray(_stop_array([int(s) for s in stops])), jnp.int32(pad),
                               jnp.int32(max_new_tokens), config=config, capacity=bucket_length(max_new_tokens),
                               top_k=top_k, options=options, stream=callback is not None)
        out, count = jax.device_get((out, count))
    finally:
        _STREAM[0] = None
    return GenerateOutput(tokens=np.asarray(out)[:, :max_new_tokens], num_tokens=np.asarray(count),
                          prompt_lengths=np.asarray([len(r) for r in rows]))
