"""How far a coded model (``fp8`` / ``int8_spiking``) is from float32 on the same tokens: perplexity change,
next-token KL(float32 || coded) and top-1 agreement, per real token (``mask``)."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from spb2_jax.model import SpB2ForCausalLM
from spb2_jax.options import resolve_options
from spb2_jax.quant.quantize import QUANTIZED_CODINGS, quantize


def mean_nll(logits: jax.Array, ids: jax.Array, mask: jax.Array | None = None) -> float:
    """Mean next-token negative log-likelihood of ``ids [B, T]`` under ``logits [B, T, V]`` (float32), over the
    positions whose target is real (``mask``: 1 for real tokens; None: all)."""
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
    w = jnp.ones_like(nll) if mask is None else (mask[:, 1:] * mask[:, :-1]).astype(jnp.float32)
    return float(jnp.sum(nll * w) / jnp.sum(w))


def agreement(ref: jax.Array, out: jax.Array, mask: jax.Array | None = None) -> tuple[float, float]:
    """``(top-1 agreement, mean KL(ref || out))`` over the real positions of ``[B, T, V]`` logits."""
    lr, lo = jax.nn.log_softmax(ref.astype(jnp.float32), -1), jax.nn.log_softmax(out.astype(jnp.float32), -1)
    kl = jnp.sum(jnp.exp(lr) * (lr - lo), axis=-1)
    same = (jnp.argmax(ref, -1) == jnp.argmax(out, -1)).astype(jnp.float32)
    w = jnp.ones_like(kl) if mask is None else mask.astype(jnp.float32)
    return float(jnp.sum(same * w) / jnp.sum(w)), float(jnp.sum(kl * w) / jnp.sum(w))


def disagreement_margins(ref: jax.Array, out: jax.Array, mask: jax.Array | None = None) -> dict[str, float]:
    """Why top-1 choices flip: the float32 model's top-1 minus top-2 logit gap (median over all real positions and
    over those where the coded argmax differs) and the rms of the coded logit error (each position's error
    centred, so a shift common to all logits, which changes no probability, does not count)."""
    ref, out = np.asarray(ref, np.float64), np.asarray(out, np.float64)
    real = np.ones(ref.shape[:-1], bool) if mask is None else np.asarray(mask, bool)
    top2 = np.sort(ref, axis=-1)[..., -2:]
    gap = (top2[..., 1] - top2[..., 0])[real]
    flip = (ref.argmax(-1) != out.argmax(-1))[real]
    err = (out - ref)[real]
    err = err - err.mean(-1, keepdims=True)
    return {"gap_median": float(np.median(gap)),
            "gap_median_flipped": float(np.median(gap[flip])) if flip.any() else float("nan"),
            "gap_below_error_share": float(np.mean(gap < np.sqrt(np.mean(err ** 2)))),
            "logit_error_rms": float(np.sqrt(np.mean(err ** 2)))}


def coding_accuracy(config, params: Any, ids: np.ndarray, mask: np.ndarray | None = None, *,
                    codings: tuple[str, ...] = QUANTIZED_CODINGS, spike_k: float = 3.0,
                    lm_head: bool = False) -> dict[str, Any]:
    """Float32 vs each coding on token ids ``[B, T]``: ``{"ppl_float32", coding: {"ppl", "ppl_change",
    "top1_agreement", "kl", and ``disagreement_margins``}}`` (``ppl_change`` relative, e.g. 0.01 = +1%)."""
    ids = jnp.asarray(ids, jnp.int32)
    mask = None if mask is None else jnp.asarray(mask, jnp.int32)

    def logits(options, p):
        return jax.jit(lambda p, i, m: SpB2ForCausalLM(config, options).apply({"params": p}, i, m).logits)(
            p, ids, mask)

    ref = logits(resolve_options(config), params)
    nll = mean_nll(ref, ids, mask)
    out: dict[str, Any] = {"tokens": int(ids.size if mask is None else mask.sum()), "ppl_float32": math.exp(nll)}
    for coding in codings:
        coded = logits(resolve_options(config, coding=coding, spike_k=spike_k, quantize_lm_head=lm_head),
                       quantize(params, config, coding, lm_head=lm_head))
        top1, kl = agreement(ref, coded, mask)
        ppl = math.exp(mean_nll(coded, ids, mask))
        out[coding] = {"ppl": ppl, "ppl_change": ppl / out["ppl_float32"] - 1, "top1_agreement": top1, "kl": kl,
                       **disagreement_margins(ref, coded, mask)}
    return out
