"""Model FLOPs per training token for MFU, counting what this hybrid actually computes.

Per token of a row of ``T`` tokens (a multiply-add = 2 FLOPs), forward:

- dense matmuls: ``2 * n_matmul`` where ``n_matmul`` is the number of weights in every projection kernel and the
  LM head (embedding lookups are free; a tied head counts once, as the head);
- softmax attention, per layer: ``4 * heads * head_dim * keys`` (scores and the weighted sum), with the keys a
  token sees on average:
  full causal: ``(T + 1) / 2``; MoBA (block C, top-k including the own block): ``(C + 1) / 2 + (k - 1) C``,
  capped at the causal ``(T + 1) / 2`` (early tokens have fewer earlier blocks); SWA half of an SSE layer:
  ``min(window, (T + 1) / 2)``;
- SSE linear attention (chunked GDN / GLA, chunk ``c``), per head and sparse partition a token touches
  (``num_writer`` partitions are written, ``num_reader`` read; the varlen form reads what it writes):
  ``4 K V`` (state contribution to the output and the state update) + ``2 c (K + V)`` (the intra-chunk
  attention, ``c / 2`` keys on average, scores and values, and the chunk's WY / UT solve, counted once).

Training = 3 x forward (the backward is two matmuls per forward matmul): the model FLOPs. MFU = (model FLOPs per
token x tokens per second) / the devices' peak FLOP/s, whatever the remat policy (PaLM's definition: recomputation
is not useful work). The hardware FLOPs (HFU) add one more forward per recomputed block: ``remat="full"`` adds
1 x forward (``save_dots`` / ``save_mixer_outputs`` recompute only elementwise work and are counted as no remat).
Norms, activations, routing and the loss's softmax are not counted (< 1% at these sizes), as in MaxText.
"""

from __future__ import annotations

import math

import jax

from spb2_jax.config import LayerKind, SpB2Config

PEAK_FLOPS = {  # dense bf16 FLOP/s per device, from the vendors' data sheets
    "tpu v4": 275e12,
    "tpu v5 lite": 197e12,
    "tpu v5e": 197e12,
    "tpu v5p": 459e12,
    "tpu v6 lite": 918e12,
    "nvidia h100": 989e12,
    "nvidia h200": 989e12,
    "nvidia a100": 312e12,
}


def matmul_params(config: SpB2Config, params_shapes) -> int:
    """Weights of every 2-D projection kernel (and the head), from a params tree of shapes (``abstract_params``);
    the embedding table counts only when it is also the (tied) head."""
    total = 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(params_shapes):
        names = [str(getattr(k, "key", k)) for k in path]
        if names[-1] == "kernel" and len(leaf.shape) == 2:
            total += math.prod(leaf.shape)
        elif names[-1] == "embedding" and config.tie_word_embeddings:
            total += math.prod(leaf.shape)
    return total


def mixer_flops(config: SpB2Config, seq_len: int, chunk_size: int = 64) -> float:
    """Forward FLOPs per token of the token mixers beyond their projections (module docstring)."""
    a = config.attn
    causal = (seq_len + 1) / 2
    head_dim = config.head_dim
    total = 0.0
    for kind in config.layer_kinds:
        if kind == LayerKind.FULL:
            total += 4 * a.num_heads * head_dim * causal
        elif kind == LayerKind.MOBA:
            C = a.moba_chunk_size
            keys = min((C + 1) / 2 + (a.moba_topk - 1) * C, causal)
            total += 4 * a.num_heads * head_dim * keys
        else:
            window = a.window_size if a.window_size else seq_len
            total += 4 * a.num_heads * head_dim * min(window, causal)
            K = head_dim
            V = int(head_dim * config.expand_v)
            parts = max(config.num_writer, config.num_reader)
            c = min(chunk_size, seq_len)
            total += config.num_v_heads * parts * (4 * K * V + 2 * c * (K + V))
    return total


def train_flops_per_token(config: SpB2Config, params_shapes, seq_len: int, *, remat: str = "none",
                          chunk_size: int = 64) -> float:
    """Training FLOPs per token: ``(3 + [remat == "full"]) x (2 n_matmul + mixer FLOPs)``; with the default
    ``remat="none"`` the model FLOPs of MFU, with the run's policy the hardware FLOPs of HFU."""
    forward = 2 * matmul_params(config, params_shapes) + mixer_flops(config, seq_len, chunk_size)
    return (4 if remat == "full" else 3) * forward


def peak_flops(device) -> float | None:
    """Peak bf16 FLOP/s of ``device`` from ``PEAK_FLOPS`` by its ``device_kind`` (None when unknown, e.g. CPU)."""
    kind = str(getattr(device, "device_kind", "")).lower()
    for name, value in PEAK_FLOPS.items():
        if kind.startswith(name):
            return value
    return None
