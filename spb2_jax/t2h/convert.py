"""Transformer-to-Hybrid conversion: a Qwen3 (all-full-attention) teacher's weights -> a SpB2 hybrid student.

What each student tensor becomes (``ConversionRow.how``):

- ``copied``: embeddings, final norm, ``lm_head``, every block norm and MLP; full / MoBA layers' q/k/v/o and q/k
  norms; an SSE layer's SWA branch (``swa_{q,k,v,o}_proj``, ``swa_{q,k}_norm`` from the teacher's attention) and
  its SSE ``sse_q_proj`` / ``sse_o_proj`` (from q / o);
- ``repeated``: an SSE layer's ``sse_k_proj`` / ``sse_v_proj`` from the teacher's k / v, each kv head repeated
  ``num_heads / num_kv_heads`` times in HF ``repeat_kv`` order (student head h takes teacher kv head h // group);
- ``new``: everything else, initialised as the official ``_init_weights`` (``spb2_jax.init_params``: linears
  N(0, initializer_range), norms 1, ``A_log`` / ``dt_bias`` as the official layer), except the second factor of
  ``lora_q_proj`` / ``lora_k_proj``, which is zero so that the SSE layer starts with q2 = q1 and k2 = k1.

The teacher and student must agree on width, depth, heads, head dim, vocabulary, MLP size and tying; a mismatch is
a ``ValueError`` naming the field.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from einops import repeat
from flax import traverse_util

from spb2_jax.checkpoint.hf import hf_param_spec
from spb2_jax.checkpoint.qwen3 import qwen3_name
from spb2_jax.config import LayerKind, SpB2Config
from spb2_jax.model import abstract_params, init_params

COPIED, REPEATED, NEW = "copied", "repeated", "new"

# SSE-layer student tensor -> (teacher attention tensor, how)
_SSE_FROM_TEACHER = {
    "swa_q_proj": ("q_proj", COPIED), "swa_k_proj": ("k_proj", COPIED), "swa_v_proj": ("v_proj", COPIED),
    "swa_o_proj": ("o_proj", COPIED), "swa_q_norm": ("q_norm", COPIED), "swa_k_norm": ("k_norm", COPIED),
    "sse_q_proj": ("q_proj", COPIED), "sse_o_proj": ("o_proj", COPIED),
    "sse_k_proj": ("k_proj", REPEATED), "sse_v_proj": ("v_proj", REPEATED),
}
_ZEROED = ("lora_q_proj_1", "lora_k_proj_1")


@dataclasses.dataclass(frozen=True)
class ConversionRow:
    """One student tensor: its HF name and shape, how it was made, and the teacher (Qwen3) tensor it came from."""

    name: str
    shape: tuple[int, ...]
    how: str
    source: str | None = None


def check_compatible(teacher: SpB2Config, student: SpB2Config) -> None:
    """Raise ``ValueError`` naming the first field on which ``student`` cannot take ``teacher``'s weights."""
    same = ("vocab_size", "hidden_size", "num_hidden_layers", "head_dim", "mlp_intermediate_size",
            "tie_word_embeddings")
    for f in same:
        if getattr(teacher, f) != getattr(student, f):
            raise ValueError(f"student {f}={getattr(student, f)!r} differs from the teacher's {getattr(teacher, f)!r}")
    ta, sa = teacher.attn, student.attn
    for f in ("num_heads", "kv_heads"):
        if getattr(ta, f) != getattr(sa, f):
            name = "attn.num_kv_heads" if f == "kv_heads" else "attn.num_heads"
            raise ValueError(f"student {name}={getattr(sa, f)!r} differs from the teacher's {getattr(ta, f)!r}")
    if not sa.qk_norm:
        raise ValueError("student attn.qk_norm=False: the teacher's q/k norms would be dropped (Qwen3 has qk-norm)")
    if any(k in (LayerKind.SSE_GDN, LayerKind.SSE_GLA) for k in student.layer_kinds) \
            and student.num_heads != ta.num_heads:
        raise ValueError(f"student num_heads={student.num_heads} (SSE / SWA heads) differs from the teacher's "
                         f"attn.num_heads={ta.num_heads}")


def config_changes(teacher: SpB2Config, student: SpB2Config) -> list[tuple[str, Any, Any]]:
    """``[(field, teacher value, student value)]`` for the attention settings and limits the student changes."""
    fields = [("attn.rope_theta", teacher.attn.rope_theta, student.attn.rope_theta),
              ("norm_eps", teacher.norm_eps, student.norm_eps),
              ("max_position_embeddings", teacher.max_position_embeddings, student.max_position_embeddings),
              ("attn.qkv_bias", teacher.attn.qkv_bias, student.attn.qkv_bias)]
    return [(f, a, b) for f, a, b in fields if a != b]


def _repeat_heads(kernel: jax.Array, kv_heads: int, group: int) -> jax.Array:
    """Flax ``[D, K*H]`` kernel -> ``[D, K*group*H]``: kv head k becomes heads k*group .. k*group+group-1."""
    return repeat(kernel, "D (K H) -> D (K g H)", K=kv_heads, g=group)


def convert(teacher: SpB2Config, teacher_params: Any, student: SpB2Config, *,
            seed: int = 0) -> tuple[Any, list[ConversionRow]]:
    """``(student params, one ConversionRow per student tensor)`` (module docstring for the rules).

    ``teacher`` is the all-full-attention config of the Qwen3 teacher (``spb2_jax.checkpoint.qwen3_config``).
    New tensors are drawn from ``jax.random.key(seed)`` and have the teacher's dtype.
    """
    check_compatible(teacher, student)
    tflat = traverse_util.flatten_dict(teacher_params)
    dtype = jax.tree_util.tree_leaves(teacher_params)[0].dtype
    fresh = traverse_util.flatten_dict(init_params(student, jax.random.key(seed), param_dtype=dtype))
    group = teacher.attn.num_heads // teacher.attn.kv_heads
    flat: dict[tuple[str, ...], jax.Array] = {}
    rows = []
    spec = hf_param_spec(student)
    by_path = {v[0]: k for k, v in spec.items()}
    teacher_names = {v[0]: k for k, v in hf_param_spec(teacher).items()}
    for path in sorted(fresh):
        source, how = _source(path, student)
        if source is not None and source not in tflat:
            raise ValueError(f"teacher params have no {'/'.join(source)} (for student {'/'.join(path)})")
        if how == COPIED:
            value = tflat[source]
        elif how == REPEATED:
            value = _repeat_heads(tflat[source], teacher.attn.kv_heads, group)
        elif path[-2] in _ZEROED:
            value = jnp.zeros_like(fresh[path])
        else:
            value = fresh[path]
        if value.shape != fresh[path].shape:
            raise ValueError(f"student {'/'.join(path)} has shape {fresh[path].shape}, its source "
                             f"{'/'.join(source)} gives {value.shape}")
        flat[path] = value
        src_name = None if source is None else qwen3_name(teacher_names[source])
        rows.append(ConversionRow(by_path[path], tuple(spec[by_path[path]][1]), how, src_name))
    rows.sort(key=lambda r: _natural(r.name))
    return traverse_util.unflatten_dict(flat), rows


def _natural(name: str):
    return [int(p) if p.isdigit() else p for p in name.split(".")]


def _source(path: tuple[str, ...], student: SpB2Config) -> tuple[tuple[str, ...] | None, str]:
    """The teacher param path a student param comes from (None: new) and how."""
    if path[1].startswith("layers_") and path[2] == "attn":
        layer = int(path[1].split("_")[1])
        kind = student.layer_kind(layer)
        module = path[3]
        if kind in (LayerKind.FULL, LayerKind.MOBA):
            if path[-1] == "bias":
                return None, NEW
            return path, COPIED
        if module in _SSE_FROM_TEACHER and path[-1] != "bias":
            name, how = _SSE_FROM_TEACHER[module]
            return path[:3] + (name,) + path[4:], how
        return None, NEW
    return path, COPIED  # embeddings, norms, MLPs, lm_head


def format_table(rows: list[ConversionRow], changes: list[tuple[str, Any, Any]]) -> str:
    """The conversion table as text: one line per tensor, a count per kind, then the config changes."""
    width = max(len(r.name) for r in rows)
    lines = [f"{'student tensor':<{width}}  {'shape':<14}  {'how':<8}  source (Qwen3)"]
    for r in rows:
        lines.append(f"{r.name:<{width}}  {str(list(r.shape)):<14}  {r.how:<8}  {r.source or '-'}")
    counts = {h: sum(r.how == h for r in rows) for h in (COPIED, REPEATED, NEW)}
    params = {h: sum(int(np.prod(r.shape)) for r in rows if r.how == h) for h in (COPIED, REPEATED, NEW)}
    lines.append("")
    lines.append("  ".join(f"{h}: {counts[h]} tensors / {params[h]:,} params" for h in (COPIED, REPEATED, NEW)))
    if changes:
        lines.append("config changes (teacher -> student): "
                     + "; ".join(f"{f} {a!r} -> {b!r}" for f, a, b in changes))
    else:
        lines.append("config changes (teacher -> student): none")
    return "\n".join(lines) + "\n"


def new_param_mask(student: SpB2Config) -> Any:
    """Boolean tree over ``student``'s params: True for the tensors conversion creates (``new`` in the table),
    the ones the alignment stage trains (``distill.train_only_new``)."""
    flat = traverse_util.flatten_dict(abstract_params(student))
    return traverse_util.unflatten_dict({path: _source(path, student)[1] == NEW for path in flat})
