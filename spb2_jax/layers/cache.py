"""Decoding caches: static-shape pytrees, one per layer, and the description of the tokens being added.

- ``KVCache`` (full and MoBA layers): post-RoPE keys and values indexed by position, ``[B, K, S, H]`` with
  ``S = max_len`` (kv-head major: a MoBA decode step gathers contiguous ``[C, H]`` runs of one head's keys);
  MoBA layers also keep float32 per-block key sums ``[B, ceil(S / C), K, H]`` (the block means of the gates
  are ``sum / C`` for the complete earlier blocks).
- ``SSECache`` (SSE + SWA layers): float32 recurrent states ``[B, 1 + P, N, H, E]`` (shared + one per
  partition) and a ring buffer of the last ``window_size`` SWA keys/values with their positions (-1 = empty).
- ``Cache``: the per-layer caches and ``length [B]``, the number of real tokens each row has seen (= the position
  of its next token).

``CacheStep`` describes one call that adds tokens (a prefill piece or a decode step): which new tokens are real
(``valid``; padding tokens touch no cache) and their positions. Its static fields choose the code path:
``fresh`` (the cache is empty, so attention runs with the forward's blockwise ops and the cache is only written),
``moba_dense`` (official decode: MoBA layers attend densely) and ``rope_offset`` (official quirk: layers >= 1
rotate the new tokens at ``position + rope_offset``).

Shape letters: see ``spb2_jax.parallel.rules`` (the ring buffer's length is ``W``, the SWA window).
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from jax.sharding import NamedSharding, PartitionSpec

from spb2_jax.config import LayerKind, SpB2Config
from spb2_jax.ops.cached_attention import add_slots, write_slots
from spb2_jax.parallel.mesh import SEQUENCE_AXIS


@flax.struct.dataclass
class CacheStep:
    """The tokens one call adds: ``valid [B, T]`` bool and true ``positions [B, T]`` int32 (-1 at padding)."""

    valid: jax.Array
    positions: jax.Array
    fresh: bool = flax.struct.field(pytree_node=False, default=False)
    moba_dense: bool = flax.struct.field(pytree_node=False, default=False)
    rope_offset: int = flax.struct.field(pytree_node=False, default=0)

    @classmethod
    def after(cls, length: jax.Array, valid: jax.Array, **static) -> "CacheStep":
        """Positions of the real tokens of ``valid [B, T]`` continuing rows that have seen ``length [B]``."""
        valid = valid.astype(bool)
        pos = length[:, None].astype(jnp.int32) + jnp.cumsum(valid, axis=1, dtype=jnp.int32) - 1
        return cls(valid=valid, positions=jnp.where(valid, pos, -1), **static)

    def slots(self, size: int) -> jax.Array:
        """Position-indexed write slots ``[B, T]``: the position, or ``size`` (dropped) for padding."""
        return jnp.where(self.valid, self.positions, size)


@flax.struct.dataclass
class KVCache:
    """Full / MoBA attention layer cache (module docstring)."""

    k: jax.Array
    v: jax.Array
    block_sums: jax.Array | None = None

    def append(self, k: jax.Array, v: jax.Array, step: CacheStep, chunk_size: int | None = None) -> "KVCache":
        """Write the real tokens' ``k, v [B, T, K, H]`` at their positions (and add them to the block sums)."""
        S = self.k.shape[2]
        slots = step.slots(S)
        sums = self.block_sums
        if sums is not None:
            blocks = jnp.where(step.valid, step.positions // chunk_size, sums.shape[1])
            sums = add_slots(sums, k.astype(sums.dtype), blocks)
        return KVCache(k=write_slots(self.k, k, slots, axis=2), v=write_slots(self.v, v, slots, axis=2),
                       block_sums=sums)


@flax.struct.dataclass
class SSECache:
    """SSE + SWA layer cache (module docstring)."""

    state: jax.Array
    k: jax.Array
    v: jax.Array
    pos: jax.Array

    @property
    def window(self) -> int:
        return self.k.shape[1]

    def append(self, k: jax.Array, v: jax.Array, step: CacheStep, state: jax.Array) -> "SSECache":
        """New recurrent ``state``; the ring keeps the last ``window`` real tokens (older ones are not written,
        so no slot is written twice)."""
        W = self.window
        last = jnp.max(jnp.where(step.valid, step.positions, -1), axis=1, keepdims=True)  # [B, 1]
        keep = step.valid & (step.positions > last - W)
        slots = jnp.where(keep, step.positions % W, W)
        return SSECache(state=state, k=write_slots(self.k, k, slots), v=write_slots(self.v, v, slots),
                        pos=write_slots(self.pos, step.positions, slots))


@flax.struct.dataclass
class Cache:
    """All layer caches, ``length [B]`` int32 (real tokens seen per row) and the static ``max_len``."""

    layers: tuple[Any, ...]
    length: jax.Array
    max_len: int = flax.struct.field(pytree_node=False, default=0)

    @property
    def batch_size(self) -> int:
        return self.length.shape[0]


def window_size(config: SpB2Config, max_len: int) -> int:
    """SWA ring size: ``attn.window_size`` (``None`` = full causal, i.e. ``max_len``)."""
    w = config.attn.window_size
    return max_len if w is None else min(w, max_len)


def init_cache(config: SpB2Config, batch_size: int, max_len: int, dtype: Any = jnp.float32, *,
               mesh: Any = None) -> Cache:
    """An empty cache for ``batch_size`` rows of up to ``max_len`` tokens (prompt + generated).

    K/V are stored in ``dtype`` (the compute dtype), recurrent states and MoBA block sums in float32.

    ``mesh`` (a ``Mesh`` or, inside ``jit``, ``jax.sharding.get_abstract_mesh()``) with ``sequence = P > 1``: the
    full / MoBA K/V buffers are sharded along their slot axis over ``sequence`` (``max_len`` rounded up to a
    multiple of P slots; the extra slots stay unused), which is what a sequence-sharded prefill fills and what
    ``decode_step`` attends over shard by shard (``spb2_jax.parallel.sequence.cache_attention``). The recurrent
    states, the SWA ring and the MoBA block sums are small and replicated.
    """
    if batch_size < 1 or max_len < 1:
        raise ValueError(f"init_cache needs batch_size >= 1 and max_len >= 1, got {batch_size=} {max_len=}")
    a = config.attn
    B, N, K, H, P = batch_size, config.num_heads, a.kv_heads, config.head_dim, config.num_sparse_partition
    shards = 1 if mesh is None else int(dict(mesh.shape).get(SEQUENCE_AXIS, 1))
    slots = -(-max_len // shards) * shards

    def kv_buffer():
        x = jnp.zeros((B, K, slots, H), dtype)
        if shards == 1:
            return x
        return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, PartitionSpec(None, None, SEQUENCE_AXIS)))

    layers = []
    for kind in config.layer_kinds:
        if kind in (LayerKind.FULL, LayerKind.MOBA):
            sums = None  # k and v must be distinct buffers (both may be donated)
            if kind == LayerKind.MOBA:
                sums = jnp.zeros((B, -(-slots // a.moba_chunk_size), K, H), jnp.float32)
            layers.append(KVCache(k=kv_buffer(), v=kv_buffer(), block_sums=sums))
        else:
            W = window_size(config, max_len)
            state = jnp.zeros((B, 1 + P, N, H, H), jnp.float32)  # [B, 1 + P, N, H, E] with E = H
            layers.append(SSECache(state=state, k=jnp.zeros((B, W, K, H), dtype), v=jnp.zeros((B, W, K, H), dtype),
                                   pos=jnp.full((B, W), -1, jnp.int32)))
    return Cache(layers=tuple(layers), length=jnp.zeros((B,), jnp.int32), max_len=max_len)
