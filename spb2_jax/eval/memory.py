"""Predicted per-device memory of a prefill: params + caches + logits + activations, from shapes.

``predict_memory(config, context, mesh=None, dtype=None)`` returns the bytes the prefill program of
``spb2_jax.eval.speed`` holds at once (the number ``speed`` measures), in four parts:

* ``params``: every parameter's shape x its dtype (``abstract_params``), divided over ``fsdp x tensor``;
* ``cache``: the decoding cache of ``context + extra_slots`` slots (``init_cache`` traced abstractly: K/V of the
  full / MoBA layers, MoBA block sums, the SWA rings and the SSE states), the K/V slot axis divided over
  ``sequence``;
* ``logits``: the last token's ``[B, V]`` float32 logits, and the token ids and their validity mask;
* ``activations``: the working set of the largest layer plus what every other layer keeps alive until the end of
  the program (XLA writes each layer's new cache entries into the donated buffers after the stack). Both are per
  layer kind and linear in the context: ``W_kind(T)`` and ``R_kind(T)``. They come from XLA's buffer assignment of
  small homogeneous stacks compiled for abstract shapes only (2 and 4 layers of one kind at two short contexts:
  ``R = (temp_4 - temp_2) / 2``, ``W = temp_2 - R``; nothing runs), and are extrapolated linearly in T. For a
  model with layers ``l``: ``activations = max_l W_kind(l) + sum_{l != argmax} R_kind(l)``, divided over
  ``sequence`` (the tokens are).

Linear in T is an approximation of XLA's buffer assignment, whose per-token temporaries can jump where its
schedule changes: for ``configs/tiny.json`` (width 64) the SSE stack's temporaries are 16.3, 32.6, 69.3, 82.5 and
155.4 MiB at T = 256 ... 4,096; for ``small-8l`` from 4k to 64k the prediction holds within 11 % (BENCHMARKS.md).
The calibration contexts default to 4,096 and 8,192; ``speed`` and ``tools/memory_model.py --check`` calibrate at
the curve's two shortest contexts. The prediction is checked against the measured peaks of every ``speed`` point
(BENCHMARKS.md); the linear extrapolation is the model's claim, tested out to 8x the calibration contexts.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp

from spb2_jax.config import LayerKind, SpB2Config
from spb2_jax.generate.decode import extend_in_place
from spb2_jax.layers.cache import init_cache
from spb2_jax.model import abstract_params
from spb2_jax.options import resolve_options

CALIBRATION_T = (4096, 8192)


def _bytes(tree) -> int:
    return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def _stack(config: SpB2Config, kind: str, layers: int) -> SpB2Config:
    every = tuple(range(layers))
    attn = {LayerKind.FULL: (every, every), LayerKind.MOBA: (every, ())}.get(kind, ((), ()))
    return config.replace(num_hidden_layers=layers, attn={"layers": attn[0], "full_layers": attn[1]})


def _prefill_temp(config: SpB2Config, T: int, dtype: Any) -> int:
    """XLA's temporary bytes of the prefill of ``T`` tokens into an empty cache (compiled for shapes only)."""
    options = resolve_options(config, dtype=dtype)
    cache = jax.eval_shape(lambda: init_cache(config, 1, T, options.dtype))
    ids = jax.ShapeDtypeStruct((1, T), jnp.int32)
    valid = jax.ShapeDtypeStruct((1, T), jnp.bool_)
    compiled = extend_in_place.lower(abstract_params(config), ids, valid, cache, config=config, fresh=True,
                                     all_logits=False, options=options).compile()
    return int(compiled.memory_analysis().temp_size_in_bytes)


@functools.lru_cache(maxsize=None)
def layer_costs(config: SpB2Config, kind: str, dtype: Any = None,
                calibration: tuple[int, int] = CALIBRATION_T) -> dict[str, tuple[float, float]]:
    """``{"working": (bytes per token, fixed bytes), "kept": (...)}`` of one layer of ``kind`` in ``config``'s
    sizes (see the module docstring), from stacks compiled at the two contexts ``calibration``."""
    points = {}
    for T in calibration:
        t2, t4 = (_prefill_temp(_stack(config, kind, n), T, dtype) for n in (2, 4))
        kept = (t4 - t2) / 2
        points[T] = (t2 - kept, kept)
    (a, b) = calibration
    out = {}
    for i, name in enumerate(("working", "kept")):
        slope = (points[b][i] - points[a][i]) / (b - a)
        out[name] = (slope, points[a][i] - slope * a)
    return out


def predict_memory(config: SpB2Config, context: int, *, mesh=None, dtype: Any = None, batch: int = 1,
                   extra_slots: int = 0, calibration: tuple[int, int] = CALIBRATION_T) -> dict[str, int]:
    """Predicted bytes per device of a prefill of ``context`` tokens (batch ``batch``) into a cache of
    ``context + extra_slots`` slots: ``{"params", "cache", "logits", "activations", "total"}``. ``mesh``: a
    ``Mesh`` or a ``{axis: size}`` dict."""
    parts = static_memory(config, context, mesh=mesh, dtype=dtype, batch=batch, extra_slots=extra_slots)
    seq = _mesh_sizes(mesh).get("sequence", 1)
    sizes_only = config.replace(attn={"layers": (), "full_layers": ()})  # twins share their calibration
    costs = {k: layer_costs(sizes_only, k, dtype, tuple(calibration)) for k in set(config.layer_kinds)}
    per = lambda kind, part: costs[kind][part][0] * context + costs[kind][part][1]  # noqa: E731
    kinds = list(config.layer_kinds)
    largest = max(range(len(kinds)), key=lambda i: per(kinds[i], "working"))
    act = per(kinds[largest], "working") + sum(per(k, "kept") for i, k in enumerate(kinds) if i != largest)
    parts["activations"] = int(batch * act) // seq
    parts["total"] = sum(parts.values())
    return parts


def _mesh_sizes(mesh) -> dict[str, int]:
    return {} if mesh is None else {str(k): int(v) for k, v in dict(getattr(mesh, "shape", mesh)).items()}


def static_memory(config: SpB2Config, context: int, *, mesh=None, dtype: Any = None, batch: int = 1,
                  extra_slots: int = 0) -> dict[str, int]:
    """The parts of ``predict_memory`` that are shapes alone (no compilation): ``{"params", "cache", "logits"}``."""
    sizes = _mesh_sizes(mesh)
    seq = sizes.get("sequence", 1)
    model_shards = sizes.get("fsdp", 1) * sizes.get("tensor", 1)
    options = resolve_options(config, dtype=dtype)
    params = _bytes(abstract_params(config, param_dtype=options.param_dtype)) // model_shards
    cache = _bytes(jax.eval_shape(lambda: init_cache(config, batch, context + extra_slots, options.dtype)))
    kv = sum(1 for k in config.layer_kinds if k in (LayerKind.FULL, LayerKind.MOBA))
    kv_bytes = 2 * kv * batch * config.attn.kv_heads * (context + extra_slots) * config.head_dim * \
        jnp.dtype(options.dtype).itemsize
    cache = cache - kv_bytes + kv_bytes // seq
    logits = batch * config.vocab_size * 4 + batch * context * 5 // seq  # + the int32 ids and bool mask
    return {"params": params, "cache": cache, "logits": logits}
