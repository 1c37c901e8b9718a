"""The vision tower (official ``SPB2VLVisionModel``, Qwen3-VL style) as Flax modules.

``N`` patches (all images, ``pixel_values`` row order: merge windows contiguous), width ``D``, ``M = N / m^2``
merged tokens:

- patch embedding: the Conv3d over one ``(C, temporal_patch, P, P)`` patch is a linear map of its row
  (``patch_embed/proj``: kernel ``[C*tp*P*P, D]`` = the Conv3d weight flattened and transposed) plus bias;
- plus the learned position grid interpolated bilinearly (``spb2_jax.vision.positions.pos_embed_lookup``);
- ``depth`` blocks ``x += proj(attn(LN1 x)); x += fc2(gelu_tanh(fc1(LN2 x)))``: non-causal softmax attention
  inside each frame, q / k rotated by the 2-D (row, column) rotary (NeoX halves), float32 softmax;
- after block ``deepstack_visual_indexes[k]``: deepstack merger k (concatenate each 2x2 window to ``4D``, LayerNorm
  over ``4D``, fc1, GELU (erf), fc2 to the text width);
- final merger: LayerNorm over ``D`` per patch, concatenate the window, fc1, GELU (erf), fc2.

LayerNorms (eps 1e-6) and the softmax run in float32.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from einops import rearrange

from spb2_jax.layers.common import partitioned
from spb2_jax.parallel import rules
from spb2_jax.vision.config import VisionConfig

Dtype = Any
LN_EPS = 1e-6


def _dense(features: int, name: str, std: float, axes: tuple[str | None, str | None], dtype, param_dtype):
    return nn.Dense(features, use_bias=True, dtype=dtype, param_dtype=param_dtype, name=name,
                    kernel_init=partitioned(nn.initializers.normal(std), *axes),
                    bias_init=partitioned(nn.initializers.zeros, axes[1]))


def _layer_norm(name: str, dtype, param_dtype):
    return nn.LayerNorm(epsilon=LN_EPS, use_fast_variance=False, dtype=dtype, param_dtype=param_dtype, name=name,
                        scale_init=partitioned(nn.initializers.ones, None),
                        bias_init=partitioned(nn.initializers.zeros, None))


def rotate_neox(x: jax.Array, angles: jax.Array) -> jax.Array:
    """Rotate ``x [N, heads, H]`` by ``angles [N, H / 2]`` (NeoX halves: cos / sin of ``cat(a, a)``), float32."""
    x32 = x.astype(jnp.float32)
    cos, sin = jnp.cos(angles)[:, None, :], jnp.sin(angles)[:, None, :]
    x1, x2 = jnp.split(x32, 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


class VisionAttention(nn.Module):
    """Non-causal multi-head attention inside each frame, q / k rotated by the 2-D rotary; float32 softmax."""

    config: VisionConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, angles: jax.Array, frames: jax.Array) -> jax.Array:
        c, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        qkv = _dense(3 * c.hidden_size, "qkv", c.initializer_range, (rules.VISION_EMBED, None), **kw)(x)
        q, k, v = rearrange(qkv, "N (three n H) -> three N n H", three=3, n=c.num_heads)  # [N, heads, H] each
        q, k = rotate_neox(q, angles), rotate_neox(k, angles)
        scores = jnp.einsum("qnh,knh->nqk", q.astype(jnp.float32), k.astype(jnp.float32)) * c.head_dim ** -0.5
        same = frames[:, None] == frames[None, :]  # [N, N]: attention stays inside a frame
        probs = jax.nn.softmax(jnp.where(same[None], scores, -jnp.inf), axis=-1)
        out = jnp.einsum("nqk,knh->qnh", probs, v.astype(jnp.float32)).astype(self.dtype)
        return _dense(c.hidden_size, "proj", c.initializer_range, (None, rules.VISION_EMBED), **kw)(
            rearrange(out, "N n H -> N (n H)"))


class VisionBlock(nn.Module):
    config: VisionConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, angles: jax.Array, frames: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = x + VisionAttention(self.config, **kw, name="attn")(_layer_norm("norm1", **kw)(x), angles, frames)
        return x + VisionMLP(self.config, **kw, name="mlp")(_layer_norm("norm2", **kw)(x))


class VisionMLP(nn.Module):
    config: VisionConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        c, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = _dense(c.intermediate_size, "linear_fc1", c.initializer_range, (rules.VISION_EMBED, rules.VISION_MLP),
                   **kw)(x)
        return _dense(c.hidden_size, "linear_fc2", c.initializer_range, (rules.VISION_MLP, rules.VISION_EMBED),
                      **kw)(jax.nn.gelu(h, approximate=True))


class PatchMerger(nn.Module):
    """2x2 window -> one text-width token; ``postshuffle``: the LayerNorm runs over the concatenated window
    (deepstack mergers), else over each patch (the final merger)."""

    config: VisionConfig
    postshuffle: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        window = c.hidden_size * c.spatial_merge_size ** 2
        if self.postshuffle:
            x = _layer_norm("norm", **kw)(x.reshape(-1, window))
        else:
            x = _layer_norm("norm", **kw)(x).reshape(-1, window)
        x = _dense(window, "linear_fc1", c.initializer_range, (None, None), **kw)(x)
        return _dense(c.out_hidden_size, "linear_fc2", c.initializer_range, (None, rules.EMBED), **kw)(
            jax.nn.gelu(x, approximate=False))


class VisionTower(nn.Module):
    """``(pixel_values [N, patch_dim], pos_index [N, 4], pos_weight [N, 4], angles [N, H/2], frames [N])`` ->
    ``(image_embeds [M, out], deepstack [K, M, out], hidden_states)``: ``hidden_states`` the input of block 0 and
    the output of every block (``[depth + 1, N, D]``). The position inputs come from
    ``spb2_jax.vision.positions`` for the images' grids."""

    config: VisionConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, pixel_values, pos_index, pos_weight, angles, frames):
        c, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if pixel_values.ndim != 2 or pixel_values.shape[-1] != c.patch_dim:
            raise ValueError(f"pixel_values {list(pixel_values.shape)}: rows must be {c.patch_dim} wide "
                             f"(in_channels x temporal_patch_size x patch_size^2)")
        x = _dense(c.hidden_size, "patch_embed_proj", c.initializer_range, (None, rules.VISION_EMBED), **kw)(
            pixel_values.astype(self.dtype))
        table = self.param("pos_embed", partitioned(nn.initializers.normal(1.0), None, rules.VISION_EMBED),
                           (c.num_position_embeddings, c.hidden_size), self.param_dtype)
        x = x + jnp.sum(table[pos_index] * pos_weight[..., None].astype(table.dtype), axis=1).astype(self.dtype)
        hidden, deep = [x], []
        for i in range(c.depth):
            x = VisionBlock(c, **kw, name=f"blocks_{i}")(x, angles, frames)
            hidden.append(x)
            if i in c.deepstack_visual_indexes:
                k = c.deepstack_visual_indexes.index(i)
                deep.append(PatchMerger(c, postshuffle=True, **kw, name=f"deepstack_merger_list_{k}")(x))
        image = PatchMerger(c, **kw, name="merger")(x)
        deep = jnp.stack(deep) if deep else jnp.zeros((0,) + image.shape, image.dtype)
        return image, deep, jnp.stack(hidden)
