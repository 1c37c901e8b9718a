"""``quantize(params, config, coding)``: the quantised param tree the ``fp8`` / ``int8_spiking`` model reads.

Every linear layer's float ``kernel [D, F]`` becomes (``spb2_jax.ops.quantized``):

- ``fp8``: ``kernel [F, D]`` float8_e4m3fn and ``scale [F]`` float32 (per output channel, amax / 448);
- ``int8_spiking``: ``kernel [D, F]`` int8 and ``scale [ceil(D / 128), F]`` float32 (symmetric per 128 inputs);

biases become float32. Not quantised, as the official vLLM plugin keeps them: ``sse_a_proj``, ``sse_b_proj``,
``sse_e_proj`` (gates and router), the embeddings, every norm, ``A_log`` / ``dt_bias``; the LM head only with
``lm_head=True`` (an untied head; a tied head is the embedding matrix). The result is an ordinary pytree of arrays
(save it with orbax or ``numpy.savez``), computed once.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from flax import traverse_util

from spb2_jax.config import SpB2Config
from spb2_jax.layers.common import QUANT_EXEMPT
from spb2_jax.ops.quantized import quantize_fp8_weight, quantize_int8_weight
from spb2_jax.options import CODINGS

QUANTIZED_CODINGS = tuple(c for c in CODINGS if c != "none")


def quantized_layers(params: Any, *, lm_head: bool = False) -> list[tuple[str, ...]]:
    """Paths (module paths, without ``kernel``) of the linear layers ``quantize`` codes."""
    flat = traverse_util.flatten_dict(params)
    out = []
    for path in sorted(flat):
        if path[-1] != "kernel" or path[-2] in QUANT_EXEMPT:
            continue
        if path[-2] == "lm_head" and not lm_head:
            continue
        out.append(path[:-1])
    return out


def quantize(params: Any, config: SpB2Config, coding: str, *, lm_head: bool = False) -> Any:
    """The param tree of ``config`` with every codable linear layer quantised for ``coding`` (module docstring);
    pair it with ``resolve_options(config, coding=coding, quantize_lm_head=lm_head)``."""
    if coding not in QUANTIZED_CODINGS:
        raise ValueError(f"coding={coding!r} is not one of {QUANTIZED_CODINGS}")
    if lm_head and config.tie_word_embeddings:
        raise ValueError("lm_head=True: this model's LM head is tied to the embeddings (tie_word_embeddings), "
                         "which are not quantised")
    flat = dict(traverse_util.flatten_dict(params))
    layers = quantized_layers(params, lm_head=lm_head)
    if not layers:
        raise ValueError("params hold no linear layer kernels to quantise (expected SpB2ForCausalLM params with "
                         "q_proj / o_proj / mlp kernels)")
    for layer in layers:
        kernel = flat[layer + ("kernel",)]
        if kernel.ndim != 2 or not jnp.issubdtype(kernel.dtype, jnp.floating) or jnp.finfo(kernel.dtype).bits < 16:
            raise ValueError(f"{'/'.join(layer)}/kernel is {kernel.dtype}{list(kernel.shape)}: already quantised "
                             f"or not a linear kernel")
        q, scale = quantize_fp8_weight(kernel) if coding == "fp8" else quantize_int8_weight(kernel)
        flat[layer + ("kernel",)], flat[layer + ("scale",)] = q, scale
        if layer + ("bias",) in flat:
            flat[layer + ("bias",)] = flat[layer + ("bias",)].astype(jnp.float32)
    return traverse_util.unflatten_dict(flat)
