"""Logical axis names and the ONE table that maps them to mesh axes.

Layers name the axes of every parameter (``nn.with_logical_partitioning`` in ``spb2_jax.layers.common``) and of
the activations at block boundaries and at the token mixers' inputs / outputs (``constrain``); no layer names a
mesh axis. ``RULES`` maps each logical name to mesh axes of a mesh whose axes are ``MESH_AXES``; under
``use_rules(mesh)`` the model's ``with_logical_constraint`` calls become sharding constraints, and without it they
are no-ops (a single device).

Mesh axes: ``data`` (data parallel: batch), ``fsdp`` (batch, and parameters sharded over the model width),
``tensor`` (heads, MLP width, vocabulary), ``sequence`` (contiguous shards of the time axis).

Parameter axes:

==============  =============================================================  ==========
name            what                                                           mesh axes
==============  =============================================================  ==========
``vocab``       vocabulary rows of the embeddings / lm_head                    tensor
``embed``       the model width D (input side of projections, output of o/down) fsdp
``mlp``         the gated MLP's intermediate width                             tensor
``q_heads``     query / SSE / output heads x head dim, flattened (N H)         tensor
``kv_heads``    key / value heads x head dim, flattened (K H)                  tensor
``head_dim``    per-head norm scales (q_norm, k_norm, sse_o_norm)              replicated
``low_rank``    the inner dim of low-rank projections (lora, gates, g_proj)    replicated
``partitions``  SSE router outputs (P partitions)                              replicated
``gate_heads``  per-head GDN gates / decays (2 N: shared + sparse branch)      replicated
``norm``        RMSNorm scales over D                                          replicated
``vision_embed`` the vision tower's width (VL models)                         replicated
``vision_mlp``  the vision blocks' MLP width                                   replicated
==============  =============================================================  ==========

Activation axes: ``act_batch`` (data, fsdp), ``act_seq`` (sequence), ``act_embed`` (replicated),
``act_heads`` (tensor), ``act_kv_heads`` (tensor), ``act_head_dim`` (replicated).

Shape letters: the one vocabulary of docstrings, ``# [...]`` comments, einsum / rearrange patterns and shape
variables across ``spb2_jax`` and ``pallas_kernels`` (other modules refer here):

=====  ==================================================================
B      batch
T      query time (tokens)
S      key time (cached / attended-to positions)
C      chunk / block / tile length
D      model width
F      MLP width
V      vocabulary
N      query heads (also the heads of a recurrence)
K      kv heads
G      ``N // K``, the GQA group size
H      head dim (of queries and keys)
E      value head dim of a recurrence (``= H`` in SpB2)
P      SSE partitions
L      layers
=====  ==================================================================

So attention inputs are ``q [B, T, N, H]``, ``k, v [B, S, K, H]``; recurrence inputs ``q, k [B, T, N, H]``,
``v [B, T, N, E]`` with states ``[B, N, H, E]``; SSE states ``[B, 1 + P, N, H, E]``. DESIGN.md writes the
recurrences in fla's letters (``q, k [B, T, H, K]; state [B, H, K, V]``): the same layout, other letters.
Lower-case letters inside einsum / rearrange patterns are local positions or counts that are not shapes of this
vocabulary (``t, s`` positions inside a chunk, ``n`` a count of chunks / tiles, ``m`` groups of chunks).
"""

from __future__ import annotations

import contextlib

import flax.linen as nn
import jax

MESH_AXES = ("data", "fsdp", "tensor", "sequence")

# parameter axes
VOCAB, EMBED, MLP, Q_HEADS, KV_HEADS = "vocab", "embed", "mlp", "q_heads", "kv_heads"
HEAD_DIM, LOW_RANK, PARTITIONS, GATE_HEADS, NORM = "head_dim", "low_rank", "partitions", "gate_heads", "norm"
VISION_EMBED, VISION_MLP = "vision_embed", "vision_mlp"
# activation axes
ACT_BATCH, ACT_SEQ, ACT_EMBED = "act_batch", "act_seq", "act_embed"
ACT_HEADS, ACT_KV_HEADS, ACT_HEAD_DIM = "act_heads", "act_kv_heads", "act_head_dim"

RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    (VOCAB, "tensor"),
    (EMBED, "fsdp"),
    (MLP, "tensor"),
    (Q_HEADS, "tensor"),
    (KV_HEADS, "tensor"),
    (HEAD_DIM, None),
    (LOW_RANK, None),
    (PARTITIONS, None),
    (GATE_HEADS, None),
    (NORM, None),
    (VISION_EMBED, None),  # the vision tower is small next to the text stack: replicated
    (VISION_MLP, None),
    (ACT_BATCH, ("data", "fsdp")),
    (ACT_SEQ, "sequence"),
    (ACT_EMBED, None),
    (ACT_HEADS, "tensor"),
    (ACT_KV_HEADS, "tensor"),
    (ACT_HEAD_DIM, None),
)

# block-boundary activations [B, T, D] and token-mixer head tensors [B, T, N, H] / [B, T, K, H]
HIDDEN = (ACT_BATCH, ACT_SEQ, ACT_EMBED)
HEADS = (ACT_BATCH, ACT_SEQ, ACT_HEADS, ACT_HEAD_DIM)
KV = (ACT_BATCH, ACT_SEQ, ACT_KV_HEADS, ACT_HEAD_DIM)


def constrain(x: jax.Array, names: tuple[str, ...]) -> jax.Array:
    """``nn.with_logical_constraint`` by logical names: a sharding constraint under ``use_rules``, else x."""
    return nn.with_logical_constraint(x, names)


def mesh_axes_of(name: str, rules=RULES) -> tuple[str, ...]:
    """The mesh axes a logical name maps to (``()`` = replicated); ``KeyError`` naming an unknown name."""
    table = dict(rules)
    if name not in table:
        raise KeyError(f"logical axis {name!r} is not in the rules table ({sorted(table)})")
    axes = table[name]
    return () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)


@contextlib.contextmanager
def use_rules(mesh: jax.sharding.Mesh, rules=RULES):
    """Within: ``mesh`` is the current mesh and the model's logical names map to its axes by ``rules``.

    The mesh's axes must be ``AxisType.Auto`` (``jax.make_mesh(..., axis_types=(AxisType.Auto,) * n)``): the
    logical constraints are sharding hints for the compiler; with ``Explicit`` axes (``jax.make_mesh``'s default
    in jax >= 0.7) a constraint would be an assertion about the operand's sharding instead."""
    explicit = [name for name, kind in zip(mesh.axis_names, mesh.axis_types)
                if kind == jax.sharding.AxisType.Explicit]
    if explicit:
        raise ValueError(f"mesh axes {explicit} are Explicit; the logical rules need Auto axes: "
                         "jax.make_mesh(shape, names, axis_types=(jax.sharding.AxisType.Auto,) * len(names))")
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        yield
