"""Passkey retrieval and needle-in-a-haystack over a grid of context lengths x needle depths.

Each prompt is a haystack of ``length`` tokens (question included) with a needle inserted at ``depth`` (0 = the
start, 1 = just before the question); the model continues it greedily after a (sequence-sharded, on a mesh)
prefill and a trial counts as retrieved when the answer appears in what it generates. Two prompt formats:

* ``text`` (the checkpoint has a tokenizer): the standard passkey prompt (a repeated filler sentence, "The pass
  key is N. Remember it. N is the pass key.", "What is the pass key? The pass key is") and the needle-in-a-haystack
  prompt ("The special magic number is N." in a haystack read from ``--haystack FILE`` or generated from a fixed
  word list); the answer is the number's digits in the decoded continuation.
* ``pairs`` (a model trained on the recall task, without a tokenizer): the haystack is key -> value pairs over
  the keys other than the needle's (``passkey``: one fixed block of pairs repeated, the analogue of the repeated
  filler; ``niah``: fresh random pairs), the needle is one more pair ``k* v*`` and the question is ``k*``; the
  answer is ``v*`` as the next token. Keys are ids ``3 .. 3 + S - 1``, values ``3 + S .. 3 + 2S - 1``.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from tqdm.auto import tqdm

from spb2_jax.eval.common import EvalError

PASSKEY_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
PASSKEY_NEEDLE = "The pass key is {answer}. Remember it. {answer} is the pass key. "
PASSKEY_QUESTION = "What is the pass key? The pass key is"
NIAH_NEEDLE = " The special magic number is {answer}. "
NIAH_QUESTION = " What is the special magic number mentioned in the text? The special magic number is"
_WORDS = ("river morning paper window garden silver letter market winter station village quiet orange "
          "mountain yellow summer animal journey history picture").split()
TASKS = ("passkey", "niah")


def generated_haystack(n_words: int, seed: int = 0) -> str:
    """A haystack of ``n_words`` words from a fixed word list, in sentences of 8 (when no ``--haystack`` file)."""
    rng = np.random.default_rng(seed)
    words = rng.choice(_WORDS, n_words)
    return " ".join(" ".join(words[i:i + 8]).capitalize() + "." for i in range(0, n_words, 8))


def _insert(haystack: list[int], needle: list[int], question: list[int], length: int, depth: float) -> list[int]:
    room = length - len(needle) - len(question)
    if room < 0 or len(haystack) < room:
        raise EvalError(f"context length {length} cannot hold the needle ({len(needle)} tokens), the question "
                        f"({len(question)}) and a haystack of {room} tokens (the haystack has {len(haystack)})")
    hay = haystack[:room]
    at = int(round(depth * room))
    return hay[:at] + needle + hay[at:] + question


def text_prompt(tokenizer, task: str, length: int, depth: float, answer: str, haystack_ids: list[int]) -> list[int]:
    """Token ids of a ``length``-token text prompt of ``task`` with the needle at ``depth``."""
    enc = lambda s: tokenizer.encode(s, add_special_tokens=False).ids  # noqa: E731
    template, question = (PASSKEY_NEEDLE, PASSKEY_QUESTION) if task == "passkey" else (NIAH_NEEDLE, NIAH_QUESTION)
    return _insert(haystack_ids, enc(template.format(answer=answer)), enc(question), length, depth)


def pairs_prompt(task: str, length: int, depth: float, rng: np.random.Generator, symbols: int) -> tuple[list[int], int]:
    """``(ids, answer id)`` of a pairs prompt of ``length`` tokens (``length - 1`` when even) of ``task`` with the needle pair at ``depth``."""
    if symbols < 2:
        raise EvalError(f"--symbols {symbols} must be >= 2 (a needle key and at least one other)")
    if length < 3:
        raise EvalError(f"context length {length} must be >= 3 for the pairs format (the needle pair and the "
                        "question key)")
    index = int(rng.integers(symbols))
    key, value = 3 + index, 3 + symbols + int(rng.integers(symbols))
    others = np.asarray([k for k in range(symbols) if k != index])  # key indices of the haystack
    n = (length - 3) // 2  # haystack pairs (an even length leaves one token unused)
    if task == "passkey":  # one fixed block of pairs, repeated
        block = np.stack([3 + others, 3 + symbols + (others * 7 + 3) % symbols], 1).reshape(-1)
        hay = np.resize(block, 2 * n)
    else:
        hay = np.stack([3 + rng.choice(others, n), 3 + symbols + rng.integers(0, symbols, n)], 1).reshape(-1)
    at = 2 * int(round(depth * n))  # between two pairs
    ids = np.concatenate([hay[:at], [key, value], hay[at:], [key]]).astype(int)
    return ids.tolist(), value


def retrieval_grid(model, task: str, lengths: Sequence[int], depths: Sequence[float], *, trials: int = 4,
                   fmt: str = "auto", symbols: int = 16, haystack: str | None = None, seed: int = 0,
                   progress: bool = True) -> dict:
    """Accuracy ``[len(depths), len(lengths)]`` of ``task`` (``"passkey"`` / ``"niah"``) for ``model`` (a
    ``spb2_jax.Model``; its mesh shards the prefill): ``{"format", "lengths", "depths", "accuracy", "trials",
    "examples"}`` (``examples``: the first trial's prompt tail and continuation of each cell)."""
    if task not in TASKS:
        raise EvalError(f"task {task!r} must be one of {TASKS}")
    if fmt == "auto":
        fmt = "text" if model.tokenizer is not None else "pairs"
    if fmt not in ("text", "pairs"):
        raise EvalError(f"--format {fmt!r} must be one of auto, text, pairs")
    if fmt == "text" and model.tokenizer is None:
        raise EvalError("--format text needs a checkpoint with tokenizer.json; use --format pairs")
    if not depths or any(not 0.0 <= d <= 1.0 for d in depths):
        raise EvalError(f"--depths {list(depths)} must lie in [0, 1]")
    rng = np.random.default_rng(seed)
    hay_ids: list[int] = []
    if fmt == "text":
        if haystack is not None:
            with open(haystack, encoding="utf-8", errors="replace") as f:
                text = f.read()
        elif task == "passkey":
            text = PASSKEY_FILLER * (max(lengths) // 8 + 1)
        else:
            text = generated_haystack(max(lengths) + 64, seed)
        hay_ids = model.encode(text)
        while len(hay_ids) < max(lengths) and haystack is None:  # a generated haystack is grown until it fits
            text += " " + text
            hay_ids = model.encode(text)
    acc = np.zeros((len(depths), len(lengths)))
    examples = []
    cells = [(i, j) for j in range(len(lengths)) for i in range(len(depths))]
    for i, j in tqdm(cells, desc=task, unit="cell", disable=not progress, dynamic_ncols=True):
        L, d = lengths[j], depths[i]
        rows, answers = [], []
        for _ in range(trials):
            if fmt == "text":
                answer = str(int(rng.integers(10_000, 100_000)))
                rows.append(text_prompt(model.tokenizer, task, L, d, answer, hay_ids))
            else:
                ids, answer = pairs_prompt(task, L, d, rng, symbols)
                rows.append(ids)
            answers.append(answer)
        new = 1 if fmt == "pairs" else 8
        outs = model.generate(rows, max_new_tokens=new, stop_tokens=[])
        if fmt == "text":
            said = [model.decode(o) for o in outs]
            hits = [a in s for a, s in zip(answers, said)]
            shown = model.decode(rows[0][-12:]) + " ->" + said[0]
        else:
            hits = [len(o) > 0 and o[0] == a for a, o in zip(answers, outs)]
            shown = f"{rows[0][-8:]} -> {outs[0]} (answer {answers[0]})"
        acc[i, j] = float(np.mean(hits))
        examples.append({"length": L, "depth": d, "shown": shown, "accuracy": acc[i, j]})
    return {"format": fmt, "lengths": list(lengths), "depths": list(depths), "accuracy": acc.tolist(),
            "trials": trials, "examples": examples}
