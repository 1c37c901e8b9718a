"""The notebook API of SpB2.0-VL: ``model = spb2.load_pretrained(vl_dir)`` returns a ``VLModel``;
``model(input_ids, attention_mask=None, *, pixel_values=None, image_grid_thw=None)`` runs the forward
(``spb2_jax.vl_model``) with the host-side positions computed for you."""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any

import jax
import numpy as np

from spb2_jax.api import checked_input_ids
from spb2_jax.checkpoint.vl import load_vl
from spb2_jax.options import ModelOptions, resolve_options
from spb2_jax.vision.config import VLConfig
from spb2_jax.vl_model import SpB2VLForConditionalGeneration, VLOutput, prepare_vl_inputs, vl_param_shardings


@dataclasses.dataclass(frozen=True, eq=False)
class VLModel:
    """A loaded VL model: ``config`` (``VLConfig``), ``options``, ``params`` (``visual`` + ``model``) and the
    checkpoint's ``tokenizer`` (or None)."""

    config: VLConfig
    options: ModelOptions
    params: Any
    tokenizer: Any = None
    mesh: Any = None

    @property
    def module(self) -> SpB2VLForConditionalGeneration:
        return SpB2VLForConditionalGeneration(self.config, self.options)

    def __call__(self, input_ids: Any, attention_mask: Any = None, *, pixel_values: Any = None,
                 image_grid_thw: Any = None, output_hidden_states: bool = False) -> VLOutput:
        """Forward pass (compiled once per shape): ``input_ids [B, T]`` whose ``<|image_pad|>`` runs match
        ``image_grid_thw [n, 3]`` (one run of ``t h w / 4`` tokens per image, in row order) and ``pixel_values``
        (``spb2_jax.vision.patchify_images``) -> ``VLOutput`` (``.logits [B, T, V]``). ``attention_mask``: HF
        left padding (0 = pad)."""
        ids = checked_input_ids(input_ids, self.config.text.vocab_size)
        mask = None if attention_mask is None else np.asarray(attention_mask).astype(np.int32)
        if mask is not None and mask.shape != ids.shape:
            raise ValueError(f"attention_mask shape {mask.shape} != input_ids shape {ids.shape}")
        prep = prepare_vl_inputs(self.config, ids, mask, pixel_values=pixel_values, image_grid_thw=image_grid_thw)
        pixels = None if pixel_values is None else np.asarray(pixel_values, np.float32)
        if self.mesh is not None:
            return self._apply_sharded(ids.astype(np.int32), mask, pixels, prep, output_hidden_states)
        return _apply(self.params, ids.astype(np.int32), mask, pixels, prep["vision"], prep["mrope"],
                      config=self.config, options=self.options, output_hidden_states=output_hidden_states)

    def _apply_sharded(self, ids, mask, pixels, prep, output_hidden_states):
        """Tokens padded at the end to whole sequence shards and placed ``[data x fsdp, sequence]``; the images
        and their positions replicated; the forward under the mesh's rules; the padding cut off."""
        from jax.sharding import NamedSharding, PartitionSpec

        from spb2_jax.parallel.mesh import check_batch, sequence_shards, token_sharding
        from spb2_jax.parallel.rules import use_rules

        check_batch(self.mesh, ids.shape[0])
        T = ids.shape[1]
        extra = (-T) % sequence_shards(self.mesh)
        mask = np.ones_like(ids) if mask is None else mask
        mrope = prep["mrope"]
        if extra:
            ids, mask = (np.pad(x, ((0, 0), (0, extra))) for x in (ids, mask))
            mrope = np.pad(mrope, ((0, 0), (0, extra), (0, 0)), constant_values=1)
        tokens = token_sharding(self.mesh)
        replicated = NamedSharding(self.mesh, PartitionSpec())
        mrope_sharding = NamedSharding(self.mesh, PartitionSpec(*tokens.spec, None))
        put = lambda x, sh: None if x is None else jax.device_put(x, sh)  # noqa: E731
        with use_rules(self.mesh):
            out = _apply(self.params, put(ids, tokens), put(mask, tokens), put(pixels, replicated),
                         put(prep["vision"], replicated), put(mrope, mrope_sharding), config=self.config,
                         options=self.options, output_hidden_states=output_hidden_states)
        if not extra:
            return out
        return jax.tree.map(lambda x: x[:, :T] if getattr(x, "ndim", 0) >= 2 and x.shape[1] == T + extra else x,
                            out)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (needs the checkpoint's tokenizer)."""
        if self.tokenizer is None:
            raise ValueError("this checkpoint has no tokenizer.json: pass token ids instead of text")
        return self.tokenizer.encode(text, add_special_tokens=False).ids


@functools.partial(jax.jit, static_argnames=("config", "options", "output_hidden_states"))
def _apply(params, ids, mask, pixels, vision, mrope, *, config, options, output_hidden_states):
    return SpB2VLForConditionalGeneration(config, options).apply(
        {"params": params}, ids, mask, pixel_values=pixels, vision=vision, mrope=mrope,
        output_hidden_states=output_hidden_states)


def load_vl_pretrained(path: str | os.PathLike, *, dtype: Any = None, impl: str | None = None,
                       options: ModelOptions | None = None, strict: bool = True, mesh: Any = None,
                       official_qk_bf16: bool = True, **option_kwargs) -> VLModel:
    """``load_pretrained`` for ``model_type == "spb2_vl"``: ``official_qk_bf16`` (default on, how the released
    model runs) rounds q / k to bf16 after their norms; off gives the pure-float32 model. ``mesh``: params placed
    by the logical rules (the vision tower replicated), tokens sharded ``[data x fsdp, sequence]``, the text
    stack sequence-parallel over a ``sequence`` axis."""
    from spb2_jax.generate.tokenizer import load_tokenizer

    if options is not None and (dtype is not None or impl is not None or option_kwargs):
        raise ValueError("pass either options= or dtype= / impl= / option keywords, not both")
    path = os.fspath(path)
    config, params = load_vl(path, dtype=None if options is None and dtype is None else
                             (options.dtype if options is not None else dtype), strict=strict)
    if options is None:
        options = resolve_options(config.text, dtype=dtype, impl=impl, official_qk_bf16=official_qk_bf16,
                                  mesh=mesh, **option_kwargs)
    if mesh is not None:  # each param on its shards (logical rules; the vision tower replicated)
        params = jax.device_put(params, vl_param_shardings(config, mesh))
    has_tokenizer = os.path.isfile(os.path.join(path, "tokenizer.json"))
    return VLModel(config=config, options=options, params=params, mesh=mesh,
                   tokenizer=load_tokenizer(path) if has_tokenizer else None)
