"""Multi-query associative recall (the training demo's task) over a grid of sequence lengths x numbers of pairs.

An example (``spb2_jax.train.data.recall_example``) is ``p`` key -> value pairs followed by queries of those keys,
each followed by its value; the model is scored on every queried value. A sequence of length ``L`` with ``p``
pairs has ``q = (L - 2p) / 2`` queries, so longer sequences ask more often and further from the pairs.

Accuracy is the argmax over the ``S`` possible values (ids ``3 + S .. 3 + 2S - 1``): a model that does not retrieve
scores chance, ``1 / S``. (The argmax over the whole vocabulary is reported too, as ``accuracy_any``.) The table
holds the model and, side by side, a random-init model of the same config: the evaluation must tell a model that
retrieves from one that does not.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from spb2_jax.eval.common import EvalError
from spb2_jax.model import SpB2ForCausalLM
from spb2_jax.train.data import recall_example

EVAL_SEED = 12345  # a stream no training run uses by default (training uses its run seed)


@functools.partial(jax.jit, static_argnames=("config", "options", "symbols"))
def _predictions(params, ids, *, config, options, symbols):
    """``ids [B, T]`` -> (argmax over the value ids, argmax over the vocabulary), each ``[B, T]``: the prediction
    for the next token at every position."""
    logits = SpB2ForCausalLM(config, options).apply({"params": params}, ids).logits.astype(jnp.float32)
    values = jnp.argmax(logits[..., 3 + symbols:3 + 2 * symbols], axis=-1) + 3 + symbols
    return values, jnp.argmax(logits, axis=-1)


def recall_batch(length: int, pairs: int, examples: int, symbols: int, vocab_size: int,
                 seed: int = EVAL_SEED) -> tuple[np.ndarray, np.ndarray]:
    """``(tokens [examples, T], answer mask [examples, T])`` with ``T = 2 * pairs + 2 * queries <= length``."""
    queries = (length - 2 * pairs) // 2
    if queries < 1:
        raise EvalError(f"length {length} holds no query after {pairs} pairs (needs >= {2 * pairs + 2} tokens)")
    rows = [recall_example(i, seed, pairs, queries, vocab_size, symbols) for i in range(examples)]
    return np.stack([r["tokens"] for r in rows]), np.stack([r["loss_mask"] for r in rows])


def recall_accuracy(config, options, params, length: int, pairs: int, *, examples: int = 64, symbols: int = 16,
                    batch_size: int = 16, seed: int = EVAL_SEED) -> dict[str, float]:
    """Accuracy on the queried values of ``examples`` sequences: ``{"accuracy", "accuracy_any", "answers"}``."""
    tokens, mask = recall_batch(length, pairs, examples, symbols, config.vocab_size, seed)
    run = functools.partial(_predictions, config=config, options=options, symbols=symbols)
    hit = hit_any = n = 0
    for lo in range(0, examples, batch_size):
        ids, m = tokens[lo:lo + batch_size], mask[lo:lo + batch_size].astype(bool)
        values, anything = (np.asarray(x) for x in run(params, jnp.asarray(ids)))
        target = m[:, 1:]  # the token at t + 1 is predicted at t
        hit += int((values[:, :-1] == ids[:, 1:])[target].sum())
        hit_any += int((anything[:, :-1] == ids[:, 1:])[target].sum())
        n += int(target.sum())
    return {"accuracy": hit / n, "accuracy_any": hit_any / n, "answers": n}


def recall_grid(models: dict[str, tuple[Any, Any, Any]], lengths: Sequence[int], pairs: Sequence[int], *,
                examples: int = 64, symbols: int = 16, batch_size: int = 16, progress: bool = True) -> list[dict]:
    """Rows ``{"model", "length", "pairs", "queries", "accuracy", "accuracy_any", "answers"}`` for every
    ``models[name] = (config, options, params)`` x length x pairs (cells with no room for a query are skipped)."""
    cells = [(name, L, p) for name in models for p in pairs for L in lengths if L >= 2 * p + 2]
    if not cells:
        raise EvalError(f"no --lengths {list(lengths)} holds any of --pairs {list(pairs)} plus a query")
    rows = []
    for name, L, p in tqdm(cells, desc="recall", unit="cell", disable=not progress, dynamic_ncols=True):
        config, options, params = models[name]
        acc = recall_accuracy(config, options, params, L, p, examples=examples, symbols=symbols,
                              batch_size=batch_size)
        rows.append({"model": name, "length": L, "pairs": p, "queries": (L - 2 * p) // 2, **acc})
    return rows


def format_recall_table(rows: list[dict], chance: float) -> str:
    """A text table: one line per (pairs, length), one accuracy column per model, and chance."""
    names = list(dict.fromkeys(r["model"] for r in rows))
    cells = {(r["model"], r["pairs"], r["length"]): r["accuracy"] for r in rows}
    keys = sorted({(r["pairs"], r["length"]) for r in rows})
    head = f"{'pairs':>5} {'length':>7} {'queries':>7} " + " ".join(f"{n:>12}" for n in names) + f" {'chance':>7}"
    lines = [head]
    for p, L in keys:
        accs = " ".join(f"{cells[(n, p, L)]:>12.4f}" if (n, p, L) in cells else f"{'-':>12}" for n in names)
        lines.append(f"{p:>5} {L:>7} {(L - 2 * p) // 2:>7} {accs} {chance:>7.4f}")
    return "\n".join(lines) + "\n"
