"""Prefill time (TTFT), decode speed and peak device memory vs context length, for a model and its twins.

For each variant and context ``T`` (batch 1): an empty cache of ``T + decode_steps`` slots (``init_cache``), the
prefill ``extend_in_place`` (the first piece into an empty cache: the forward's blockwise / chunked ops, buffers
donated) compiled ahead of time, then timed on random token ids until the first token's logits are on the host:
that is the TTFT. Then ``decode_steps`` single-token steps (the first one untimed: it compiles), timed together:
decode tokens/s.

Peak memory: on GPU / TPU the device's ``peak_bytes_in_use`` after the point (the process's peak so far: the points
run in increasing T); on CPU, where a device keeps no statistics, XLA's own accounting of the compiled prefill,
``arguments + outputs + temporaries - aliased`` (what the program needs at once), and the process's peak RSS
beside it. ``spb2_jax.eval.memory`` predicts the same number from shapes.

Variants: ``model`` (the config as given), ``full`` (``--baseline full``: every layer full causal attention, the
same sizes) and ``sse_swa`` (every layer SSE + SWA: the linear-time part alone). A curve stops cleanly at its first
out-of-memory (reported with its T), or at the first point slower than ``max_seconds``.
"""

from __future__ import annotations

import resource
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from spb2_jax.config import SpB2Config
from spb2_jax.generate.decode import extend_in_place
from spb2_jax.layers.cache import init_cache
from spb2_jax.model import abstract_params
from spb2_jax.options import resolve_options

VARIANTS = ("model", "full", "sse_swa")


def full_attention_twin(config: SpB2Config) -> SpB2Config:
    """``config`` with every layer full causal attention (same widths, heads, vocabulary)."""
    every = tuple(range(config.num_hidden_layers))
    return config.replace(attn={"layers": every, "full_layers": every})


def sse_swa_twin(config: SpB2Config) -> SpB2Config:
    """``config`` with every layer SSE + SWA (no MoBA, no full attention)."""
    return config.replace(attn={"layers": (), "full_layers": ()})


def random_params(config: SpB2Config, dtype: Any = jnp.float32, seed: int = 0) -> Any:
    """Every parameter drawn from N(0, initializer_range^2), norm weights included: timing and memory do not
    depend on the values, and nothing is compiled (the official init traces the whole model)."""
    leaves, tree = jax.tree.flatten(abstract_params(config, param_dtype=dtype))
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(tree, [config.initializer_range * jax.random.normal(k, x.shape, x.dtype)
                                     for k, x in zip(keys, leaves)])


def variant_config(config: SpB2Config, variant: str) -> SpB2Config:
    """The config of a variant name (``VARIANTS``)."""
    if variant == "model":
        return config
    if variant == "full":
        return full_attention_twin(config)
    if variant == "sse_swa":
        return sse_swa_twin(config)
    raise ValueError(f"variant {variant!r} must be one of {VARIANTS}")


def _is_oom(e: BaseException) -> bool:
    text = str(e)
    return isinstance(e, MemoryError) or "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or \
        "out of memory" in text


def compiled_peak_bytes(compiled) -> int | None:
    """XLA's accounting of a compiled program: arguments + outputs + temporaries - aliased (donated) bytes."""
    return _accounted_bytes(compiled.memory_analysis())


def _accounted_bytes(m) -> int | None:
    if m is None:
        return None
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes)


def _device_peak() -> int | None:
    stats = jax.devices()[0].memory_stats()
    return None if not stats or "peak_bytes_in_use" not in stats else int(stats["peak_bytes_in_use"])


def measure_point(config: SpB2Config, options, params, T: int, *, decode_steps: int = 8, seed: int = 0) -> dict:
    """One point: ``{"T", "ttft_s", "decode_tok_s", "compile_s", "peak_bytes", "peak_source", "xla_bytes",
    "temp_bytes", "rss_bytes"}``."""
    cache = init_cache(config, 1, T + decode_steps, options.dtype)
    ids = jax.random.randint(jax.random.key(seed), (1, T), 0, config.vocab_size, jnp.int32)
    valid = jnp.ones((1, T), bool)
    kw = dict(config=config, fresh=True, all_logits=False, options=options)
    t0 = time.perf_counter()
    compiled = extend_in_place.lower(params, ids, valid, cache, **kw).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    xla = _accounted_bytes(mem)
    t0 = time.perf_counter()
    logits, cache = compiled(params, ids, valid, cache)
    first = int(np.asarray(jnp.argmax(logits[0, -1])))  # on the host: the first token is known
    ttft = time.perf_counter() - t0
    step = dict(config=config, fresh=False, all_logits=False, decoding=True, options=options)
    one = jnp.ones((1, 1), bool)
    token = jnp.full((1, 1), first, jnp.int32)
    decode_tok_s = None
    if decode_steps >= 2:
        logits, cache = extend_in_place(params, token, one, cache, **step)  # compiles
        jax.block_until_ready(logits)
        t0 = time.perf_counter()
        for _ in range(decode_steps - 1):
            token = jnp.argmax(logits[:, -1:], axis=-1).astype(jnp.int32)
            logits, cache = extend_in_place(params, token, one, cache, **step)
        jax.block_until_ready(logits)
        decode_tok_s = (decode_steps - 1) / (time.perf_counter() - t0)
    device_peak = _device_peak()
    return {"T": T, "ttft_s": ttft, "decode_tok_s": decode_tok_s, "compile_s": compile_s,
            "peak_bytes": device_peak if device_peak is not None else xla,
            "peak_source": "device peak_bytes_in_use" if device_peak is not None else "xla memory_analysis",
            "xla_bytes": xla, "temp_bytes": None if mem is None else int(mem.temp_size_in_bytes),
            "rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def speed_curves(config: SpB2Config, variants: Sequence[str], lengths: Sequence[int], *, dtype: Any = None,
                 decode_steps: int = 8, max_seconds: float | None = None, seed: int = 0,
                 progress: bool = True) -> dict[str, dict]:
    """``{variant: {"points": [measure_point ...], "stopped": None | reason}}`` over increasing ``lengths``
    (``random_params`` weights)."""
    out = {}
    bar = tqdm(total=len(variants) * len(lengths), desc="speed", unit="point", disable=not progress,
               dynamic_ncols=True)
    for variant in variants:
        cfg = variant_config(config, variant)
        options = resolve_options(cfg, dtype=dtype)
        params = random_params(cfg, options.param_dtype, seed)
        points, stopped = [], None
        for T in sorted(lengths):
            bar.set_postfix_str(f"{variant} T={T}")
            if stopped is not None:
                bar.update(1)
                continue
            try:
                p = measure_point(cfg, options, params, T, decode_steps=decode_steps, seed=seed)
            except Exception as e:  # noqa: BLE001 - only out-of-memory is a result; anything else is raised
                if not _is_oom(e):
                    raise
                stopped = f"out of memory at T={T}: {' '.join(str(e).split())[:200]}"
                bar.update(1)
                continue
            points.append(p)
            bar.update(1)
            if max_seconds is not None and p["ttft_s"] > max_seconds:
                stopped = f"time limit: T={T} took {p['ttft_s']:.1f} s > --max-seconds {max_seconds}"
        out[variant] = {"points": points, "stopped": stopped}
        del params
    bar.close()
    return out
