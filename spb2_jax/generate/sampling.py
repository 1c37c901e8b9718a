"""Next-token sampling from logits: greedy, temperature, top-k, top-p (nucleus); jit-friendly.

``temperature`` and ``top_p`` may be traced (changing them does not recompile); ``top_k`` is static.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def filter_logits(logits: jax.Array, *, top_k: int | None = None, top_p: float | jax.Array = 1.0) -> jax.Array:
    """``logits [B, V]`` with everything outside the top-k and the top-p nucleus set to ``-inf``.

    top-p keeps the smallest set of most likely tokens whose probability reaches ``top_p`` (the most likely token
    is always kept); ``top_p >= 1`` keeps all.
    """
    logits = logits.astype(jnp.float32)
    if top_k is not None:
        if top_k < 1:
            raise ValueError(f"top_k={top_k} must be >= 1 (or None)")
        kth = jax.lax.top_k(logits, min(top_k, logits.shape[-1]))[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    top_p = jnp.asarray(top_p, jnp.float32)
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # probability mass of the strictly more likely tokens
    drop_sorted = (before >= top_p) & (top_p < 1.0)
    drop = jnp.zeros_like(drop_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(drop_sorted)
    return jnp.where(drop, -jnp.inf, logits)


def sample_token(logits: jax.Array, rng: jax.Array, *, temperature: float | jax.Array = 0.0,
                 top_k: int | None = None, top_p: float | jax.Array = 1.0) -> jax.Array:
    """One token per row from ``logits [B, V]``: argmax when ``temperature <= 0``, else a sample of
    ``softmax(filter_logits(logits / temperature))`` -- temperature first, then top-k, then top-p on the tempered
    distribution (the order of Hugging Face ``generate``). Returns ``[B]`` int32."""
    t = jnp.asarray(temperature, jnp.float32)

    def sampled():
        scaled = logits.astype(jnp.float32) / jnp.maximum(t, 1e-6)
        return jax.random.categorical(rng, filter_logits(scaled, top_k=top_k, top_p=top_p), axis=-1).astype(jnp.int32)

    # greedy skips the vocabulary sort of filter_logits (a cond, not a select of both)
    return jax.lax.cond(t > 0, sampled, lambda: jnp.argmax(logits, axis=-1).astype(jnp.int32))
