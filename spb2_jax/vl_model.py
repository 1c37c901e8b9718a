"""SpB2.0-VL (official ``SPB2VLForConditionalGeneration``): the vision tower, the image merge and deepstack, the
hybrid text stack with interleaved M-RoPE, the tied head.

Param tree: ``visual/...`` (``spb2_jax.vision.tower``), ``model/...`` (the text stack, ``spb2_jax.model``'s
names), ``lm_head/kernel`` when untied.

Host side (``prepare_vl_inputs``, numpy, from the token ids and the image grids: these fix the program's
shapes): the M-RoPE positions (``get_rope_index``), the vision position lookups and frame ids, and the checks that
the prompt's ``<|image_pad|>`` tokens, ``image_grid_thw`` and ``pixel_values`` agree. The forward then:

1. runs the vision tower on ``pixel_values`` -> ``image_embeds [M, D]`` and ``deepstack [K, M, D]``;
2. scatters row ``j`` of both onto the ``j``-th ``<|image_pad|>`` token in row-major ``(b, t)`` order: the image
   embedding replaces the token embedding, ``deepstack[i]`` is added to the output of text layer ``i < K``;
3. runs the text layers with the M-RoPE tables (and, with ``options.official_qk_bf16``, the official bf16
   rounding of q / k after their norms), the final norm and the head.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from spb2_jax.layers.common import dense
from spb2_jax.model import SpB2Model, build_segments, causal_lm_loss
from spb2_jax.ops.segments import Segments
from spb2_jax.options import ModelOptions, resolve_options
from spb2_jax.parallel import rules
from spb2_jax.vision import positions
from spb2_jax.vision.config import VLConfig
from spb2_jax.vision.tower import VisionTower


@flax.struct.dataclass
class VisionInputs:
    """The vision tower's host-computed inputs for a set of image grids (``spb2_jax.vision.positions``)."""

    pos_index: jax.Array  # [N, 4] int32
    pos_weight: jax.Array  # [N, 4] float32
    angles: jax.Array  # [N, H / 2] float32
    frames: jax.Array  # [N] int32


@flax.struct.dataclass
class VLOutput:
    """``logits [B, T, V]``, ``aux_losses [L]``, ``last_hidden_state [B, T, D]``; with ``output_hidden_states``:
    ``layer_inputs`` (L, each ``[B, T, D]``: what each text layer receives), ``layer_outputs`` (raw layer outputs,
    before the deepstack add), ``mixer_outputs``; ``image_embeds [M, D]``, ``deepstack_embeds [K, M, D]`` and
    ``vision_hidden_states [depth + 1, N, Dv]`` when images were given."""

    logits: jax.Array
    aux_losses: jax.Array
    last_hidden_state: jax.Array
    layer_inputs: tuple[jax.Array, ...] | None = None
    layer_outputs: tuple[jax.Array, ...] | None = None
    mixer_outputs: tuple[jax.Array, ...] | None = None
    image_embeds: jax.Array | None = None
    deepstack_embeds: jax.Array | None = None
    vision_hidden_states: jax.Array | None = None


def prepare_vl_inputs(config: VLConfig, input_ids, attention_mask=None, *, pixel_values=None,
                      image_grid_thw=None) -> dict[str, Any]:
    """Host-side inputs of the VL forward (module docstring): ``{"mrope" [B, T, 3] int32, "rope_deltas" [B, 1],
    "vision" VisionInputs or None}``; ``ValueError`` naming the mismatch when the prompt's image tokens,
    ``image_grid_thw`` and ``pixel_values`` disagree."""
    ids = np.asarray(input_ids)
    if ids.ndim != 2:
        raise ValueError(f"input_ids must be [batch, time], got shape {list(ids.shape)}")
    vc, m = config.vision, config.vision.spatial_merge_size
    n_tokens = int((ids == config.image_token_id).sum())
    if (pixel_values is None) != (image_grid_thw is None):
        raise ValueError("pixel_values and image_grid_thw go together: pass both or neither")
    vision = None
    if image_grid_thw is not None:
        grid = np.asarray(image_grid_thw, np.int64).reshape(-1, 3)
        if (grid[:, 1:] % m).any():
            raise ValueError(f"image_grid_thw {grid.tolist()}: h and w must be multiples of spatial_merge_size={m}")
        patches = int(np.prod(grid, axis=1).sum())
        pv = np.asarray(pixel_values)
        if pv.ndim != 2 or pv.shape[1] != vc.patch_dim:
            raise ValueError(f"pixel_values {list(pv.shape)}: rows must be {vc.patch_dim} wide (in_channels x "
                             f"temporal_patch_size x patch_size^2)")
        if pv.shape[0] != patches:
            raise ValueError(f"pixel_values has {pv.shape[0]} rows but image_grid_thw {grid.tolist()} needs "
                             f"{patches} (t x h x w per image)")
        if n_tokens != patches // (m * m):
            raise ValueError(f"the prompts hold {n_tokens} <|image_pad|> tokens but image_grid_thw {grid.tolist()} "
                             f"makes {patches // (m * m)} image embeddings (t x h/{m} x w/{m} per image)")
        idx, w = positions.pos_embed_lookup(grid, vc)
        vision = VisionInputs(idx, w, positions.vision_rotary_angles(positions.rotary_positions(grid, vc),
                                                                     vc.head_dim), positions.frame_ids(grid))
    elif n_tokens:
        raise ValueError(f"the prompts hold {n_tokens} <|image_pad|> tokens but no images were given")
    pos, deltas = positions.get_rope_index(ids, image_grid_thw, attention_mask,
                                           image_token_id=config.image_token_id,
                                           vision_start_token_id=config.vision_start_token_id,
                                           spatial_merge_size=m)
    return {"mrope": np.ascontiguousarray(np.transpose(pos, (1, 2, 0))).astype(np.int32), "rope_deltas": deltas,
            "vision": vision}


def scatter_images(mask: jax.Array, rows: jax.Array) -> jax.Array:
    """``rows [..., M, D]`` placed on the set positions of ``mask [B, T]`` in row-major order -> ``[..., B, T, D]``
    (zeros elsewhere)."""
    B, T = mask.shape
    order = jnp.clip(jnp.cumsum(mask.reshape(-1)) - 1, 0, max(rows.shape[-2] - 1, 0)).reshape(B, T)
    placed = jnp.take(rows, order, axis=-2)  # [..., B, T, D]
    return jnp.where(mask[..., None], placed, 0).astype(rows.dtype)


class SpB2VLForConditionalGeneration(nn.Module):
    """SpB2.0-VL (module docstring). ``apply({"params": p}, input_ids, attention_mask, pixel_values=...,
    vision=VisionInputs, mrope=[B, T, 3])`` with ``vision`` / ``mrope`` from ``prepare_vl_inputs``."""

    config: VLConfig
    options: ModelOptions | None = None

    @property
    def resolved_options(self) -> ModelOptions:
        return self.options if self.options is not None else resolve_options(self.config.text)

    def setup(self):
        c, o = self.config, self.resolved_options
        self.visual = VisionTower(c.vision, dtype=o.dtype, param_dtype=o.param_dtype)
        self.model = SpB2Model(c.text, o)
        if not c.text.tie_word_embeddings:
            self.lm_head = dense(c.text.vocab_size, "lm_head", c.text.initializer_range,
                                 axes=(rules.EMBED, rules.VOCAB), dtype=o.dtype, param_dtype=o.param_dtype)

    def __call__(self, input_ids, attention_mask=None, *, pixel_values=None, vision: VisionInputs | None = None,
                 mrope=None, deterministic: bool = True, output_hidden_states: bool = False) -> VLOutput:
        c = self.config
        segments = build_segments(input_ids, attention_mask, None)
        if mrope is not None:
            segments = segments.replace(mrope=jnp.asarray(mrope, jnp.int32))
        visual, image, deep, vis_hidden = None, None, None, None
        if pixel_values is not None:
            image, deep, vis_hidden = self.visual(pixel_values, vision.pos_index, vision.pos_weight, vision.angles,
                                                  vision.frames)
            mask = input_ids == c.image_token_id
            visual = (mask, scatter_images(mask, image), scatter_images(mask, deep))
        normed, hidden, mixed, aux, _ = self.model(input_ids, segments, deterministic, visual=visual)
        logits = self.head(normed)
        layer_inputs = None
        if output_hidden_states:
            layer_inputs = [hidden[0]]
            for i, h in enumerate(hidden[1:-1]):
                layer_inputs.append(h + visual[2][i] if visual is not None and i < c.num_deepstack else h)
        return VLOutput(logits=logits, aux_losses=aux, last_hidden_state=normed,
                        layer_inputs=None if layer_inputs is None else tuple(layer_inputs),
                        layer_outputs=tuple(hidden[1:]) if output_hidden_states else None,
                        mixer_outputs=tuple(mixed) if output_hidden_states else None,
                        image_embeds=image, deepstack_embeds=deep, vision_hidden_states=vis_hidden)


    def head(self, normed: jax.Array) -> jax.Array:
        return self.model.attend(normed) if self.config.text.tie_word_embeddings else self.lm_head(normed)

    def extend(self, input_ids, caches, step, all_logits: bool = True, *, pixel_values=None,
               vision: VisionInputs | None = None, mrope=None, mrope_delta=None):
        """Add ``input_ids [B, T]`` to the decoding caches (``spb2_jax.generate.vl``). M-RoPE positions: ``mrope
        [B, T, 3]`` (a prompt, from ``prepare_vl_inputs``), or text tokens at ``step.positions + mrope_delta [B]``
        in all three channels (decoding after a prompt whose image blocks compressed the positions). Images
        (``pixel_values``, ``vision``) are merged as in the forward. Returns ``(logits, caches)``."""
        seg = step.valid.astype(jnp.int32)
        positions = jnp.maximum(step.positions, 0)
        if mrope is None and mrope_delta is not None:
            mrope = jnp.repeat((positions + mrope_delta[:, None])[..., None], 3, axis=-1)
        segments = Segments(ids=seg, labels=seg, positions=positions,
                            mrope=None if mrope is None else jnp.asarray(mrope, jnp.int32))
        visual = None
        if pixel_values is not None:
            image, deep, _ = self.visual(pixel_values, vision.pos_index, vision.pos_weight, vision.angles,
                                         vision.frames)
            mask = input_ids == self.config.image_token_id
            visual = (mask, scatter_images(mask, image), scatter_images(mask, deep))
        normed, _, _, _, caches = self.model(input_ids, segments, True, caches, step, visual=visual)
        if not all_logits:
            T = input_ids.shape[1]
            last = jnp.max(jnp.where(step.valid, jnp.arange(T), 0), axis=1)  # [B]
            normed = jnp.take_along_axis(normed, last[:, None, None], axis=1)
        return self.head(normed), caches


def vl_loss(out: VLOutput, labels: jax.Array, config: VLConfig) -> dict[str, jax.Array]:
    """The official loss (``spb2_jax.model.causal_lm_loss``: CE over ``labels[:, 1:] != -100`` plus
    ``aux_loss_coef * sum(aux_losses)``)."""
    return causal_lm_loss(out.logits, labels, out.aux_losses, config.text.aux_loss_coef)


def vl_logical_axes(config: VLConfig) -> Any:
    """The VL params tree with its logical axis names at every leaf (the vision tower's ``vision_embed`` /
    ``vision_mlp`` are replicated by ``spb2_jax.parallel.rules``; the text stack as ``spb2_jax.model``)."""
    m = config.vision.spatial_merge_size
    n = m * m  # one image of one merged token
    vision = VisionInputs(jnp.zeros((n, 4), jnp.int32), jnp.zeros((n, 4)), jnp.zeros((n, config.vision.head_dim // 2)),
                          jnp.zeros((n,), jnp.int32))
    ids = jnp.full((1, 1), config.image_token_id, jnp.int32)
    boxed = jax.eval_shape(lambda k: SpB2VLForConditionalGeneration(config).init(
        k, ids, pixel_values=jnp.zeros((n, config.vision.patch_dim)), vision=vision,
        mrope=jnp.zeros((1, 1, 3), jnp.int32)), jax.random.key(0))
    return nn.get_partition_spec(boxed)["params"]


def vl_param_shardings(config: VLConfig, mesh) -> Any:
    """``NamedSharding`` of ``mesh`` for every VL param (``spb2_jax.parallel.rules``)."""
    return nn.logical_to_mesh_sharding(vl_logical_axes(config), mesh, rules.RULES)
