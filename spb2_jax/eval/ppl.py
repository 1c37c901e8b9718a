"""Long-document perplexity: one forward per context window (sequence-sharded on a mesh), per-position loss.

The document's tokens are cut into ``n = len // context`` non-overlapping windows of ``context`` tokens (the tail
is dropped; ``max_windows`` keeps the first ones). In each window the token at position ``p >= 1`` is predicted
from positions ``0 .. p - 1`` of that window. The cross-entropy is computed from the final hidden states one tile
of logits at a time (``spb2_jax.loss.token_nll``, float32), so no ``[T, V]`` logits array is ever built.

``ppl = exp(mean nll)`` over every predicted token; the per-position curve is the mean NLL at each position over
the windows, averaged in log-spaced position bins (does the loss keep falling with position?).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from spb2_jax.eval.common import EvalError
from spb2_jax.loss import IGNORE_INDEX, token_nll
from spb2_jax.model import SpB2ForCausalLM, head_kernel
from spb2_jax.parallel.mesh import sequence_shards, token_sharding
from spb2_jax.parallel.rules import use_rules


@functools.partial(jax.jit, static_argnames=("config", "options", "tile_size"))
def _window_nll(params, ids, *, config, options, tile_size):
    """``ids [B, T]`` -> NLL ``[B, T - 1]`` of tokens ``1 .. T - 1``."""
    out = SpB2ForCausalLM(config, options).apply({"params": params}, ids, output_logits=False)
    hidden = out.last_hidden_state
    targets = jnp.concatenate([ids[:, 1:], jnp.full_like(ids[:, :1], IGNORE_INDEX)], axis=1)
    return token_nll(hidden, head_kernel(params, config).astype(hidden.dtype), targets, tile_size=tile_size)[:, :-1]


def check_context(n_tokens: int, context: int, shards: int = 1) -> int:
    """The number of windows of ``context`` tokens in a text of ``n_tokens``; ``EvalError`` when there is none or
    the mesh's ``shards`` sequence shards do not divide ``context``."""
    if context < 2:
        raise EvalError(f"--context {context} must be >= 2 (a window predicts its tokens 1 .. context - 1)")
    if context % shards:
        raise EvalError(f"--context {context} is not divisible by the mesh's sequence={shards} shards; use a "
                        f"multiple of {shards}")
    if n_tokens < context:
        raise EvalError(f"--context {context} is longer than the text ({n_tokens} tokens); give a longer text or "
                        "a smaller --context")
    return n_tokens // context


def perplexity(model, ids: Any, context: int, *, max_windows: int | None = None, tile_size: int = 512,
               bins: int = 24, progress: bool = True) -> dict[str, Any]:
    """Perplexity of token ids ``ids [N]`` under ``model`` (a ``spb2_jax.Model``, sharded when it has a mesh).

    Returns ``{"ppl", "nll", "tokens", "windows", "context", "curve": {"position_lo", "position_hi", "nll"}}``:
    ``nll`` the mean per predicted token (nats), ``curve`` the mean NLL in log-spaced bins of window position.
    """
    ids = np.asarray(ids, np.int32).reshape(-1)
    windows = check_context(ids.size, context, sequence_shards(model.mesh))
    if max_windows is not None:
        if max_windows < 1:
            raise EvalError(f"--max-windows {max_windows} must be >= 1")
        windows = min(windows, max_windows)
    run = functools.partial(_window_nll, config=model.config, options=model.options, tile_size=tile_size)
    per_position = np.zeros(context - 1, np.float64)
    for w in tqdm(range(windows), desc="ppl windows", unit="window", disable=not progress, dynamic_ncols=True):
        window = ids[w * context:(w + 1) * context][None]
        if model.mesh is None:
            nll = run(model.params, jnp.asarray(window))
        else:
            with use_rules(model.mesh):
                nll = run(model.params, jax.device_put(window, token_sharding(model.mesh)))
        per_position += np.asarray(jax.device_get(nll), np.float64)[0]
    per_position /= windows
    mean = float(per_position.mean())
    edges = np.unique(np.round(np.geomspace(1, context, bins + 1)).astype(int))
    lo, hi = edges[:-1], edges[1:]  # positions [lo, hi) of the predicted token
    curve = [float(per_position[a - 1:b - 1].mean()) for a, b in zip(lo, hi)]
    return {"ppl": float(np.exp(mean)), "nll": mean, "tokens": int(windows * (context - 1)), "windows": windows,
            "context": context, "curve": {"position_lo": lo.tolist(), "position_hi": hi.tolist(), "nll": curve}}
