"""The causal LM (HF ``SSESWAMoBAForCausalLM``) and its training loss.

Param tree (mirrors the HF names, see ``spb2_jax.checkpoint``)::

    model/embeddings/embedding, model/layers_{i}/{attn_norm,attn,mlp_norm,mlp}/..., model/norm/scale,
    lm_head/kernel (absent when ``tie_word_embeddings``)
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from spb2_jax.config import SpB2Config
from spb2_jax.layers.block import remat_block
from spb2_jax.layers.common import Dtype, RMSNorm, dense, partitioned
from spb2_jax.loss import IGNORE_INDEX, causal_lm_loss_tiled
from spb2_jax.ops.dtypes import acc_dtype
from spb2_jax.ops.segments import Segments, pad_time
from spb2_jax.options import ModelOptions, options_from
from spb2_jax.parallel import rules


@flax.struct.dataclass
class CausalLMOutput:
    """Outputs of ``SpB2ForCausalLM``.

    Attributes:
      logits: ``[B, T, V]`` (float32 unless the compute dtype is lower); None with ``output_logits=False``.
      aux_losses: ``[L]`` float32 per-layer SSE load-balance losses (0 for attention layers).
      last_hidden_state: ``[B, T, D]`` the final normed hidden states (the head's input; what the memory-lean
        loss ``spb2_jax.loss.causal_lm_loss_tiled`` takes).
      hidden_states: with ``output_hidden_states``: tuple of L+1 ``[B, T, D]`` in the HF convention
        (``[0]`` embeddings, ``[i]`` output of block i-1, ``[L]`` last block output AFTER the final norm).
      last_block_output: with ``output_hidden_states``: raw output of the last block (before the final norm).
      mixer_outputs: with ``output_mixer_outputs``: tuple of L token-mixer outputs (before the residual add);
        what the official model returns as ``attentions``.
    """

    logits: jax.Array | None
    aux_losses: jax.Array
    last_hidden_state: jax.Array | None = None
    hidden_states: tuple[jax.Array, ...] | None = None
    last_block_output: jax.Array | None = None
    mixer_outputs: tuple[jax.Array, ...] | None = None


def build_segments(
    input_ids: jax.Array, attention_mask: jax.Array | None, segment_ids: jax.Array | None,
) -> Segments:
    """The forward's ``Segments`` (built once, passed to every op) from an HF ``attention_mask`` and/or packed
    ``segment_ids [B, T]`` (0 = padding); positions are 0 at the first real token of each segment."""
    B, T = input_ids.shape
    seg = jnp.ones((B, T), jnp.int32) if segment_ids is None else jnp.asarray(segment_ids, jnp.int32)
    if seg.shape != (B, T):
        raise ValueError(f"segment_ids shape {seg.shape} != input_ids shape {(B, T)}")
    if attention_mask is not None:
        attention_mask = jnp.asarray(attention_mask)
        if attention_mask.shape != (B, T):
            raise ValueError(f"attention_mask shape {attention_mask.shape} != input_ids shape {(B, T)}; "
                             "only 2-D [batch, seq] 0/1 padding masks are supported")
        seg = jnp.where(attention_mask != 0, seg, 0)
    return Segments.from_ids(seg)


class SpB2Model(nn.Module):
    """Embeddings, the decoder blocks and the final norm (HF ``SSESWAMoBAModel``); ``options`` resolved."""

    config: SpB2Config
    options: ModelOptions = ModelOptions()

    def setup(self):
        c, o = self.config, self.options
        self.embeddings = nn.Embed(c.vocab_size, c.hidden_size, dtype=o.dtype, param_dtype=o.param_dtype,
                                   embedding_init=partitioned(nn.initializers.normal(c.initializer_range),
                                                              rules.VOCAB, rules.EMBED))
        block = remat_block(o.remat)
        self.layers = [block(c, i, o) for i in range(c.num_hidden_layers)]
        self.norm = RMSNorm(eps=c.norm_eps, dtype=o.dtype, param_dtype=o.param_dtype)

    def __call__(self, input_ids, segments: Segments, deterministic=True, caches=None, step=None, visual=None):
        """Returns ``(final normed hidden, per-block outputs, per-block mixer outputs, aux [L], caches)``.

        With ``caches`` (one per layer) and ``step`` (``spb2_jax.layers.cache.CacheStep``) the tokens are added to
        the caches; the returned ``caches`` are the updated ones (None without). ``visual`` (VL models,
        ``spb2_jax.vl_model``): ``(image_mask [B, T] bool, image_embeds [B, T, D], deepstack [K, B, T, D])``, the
        image embeddings replace the token embeddings where the mask is set, and ``deepstack[i]`` is added to the
        output of layer ``i < K`` (the per-block outputs returned are the raw ones, before that add).
        """
        T = input_ids.shape[1]
        shards = self.options.kernels.sequence_shards
        if T % shards and (caches is None or step.fresh):  # sequence parallel: pad once, to whole shards
            input_ids = pad_time(input_ids, shards)  # padding tokens (segment 0; no cache slot is written)
            segments = jax.tree.map(lambda a: pad_time(a, shards), segments)
            if step is not None:
                step = step.replace(valid=pad_time(step.valid, shards, False),
                                    positions=pad_time(step.positions, shards, -1))
        x = self.embeddings(input_ids)  # [B, T, D]
        if visual is not None:
            mask, image, deep = visual
            if x.shape[1] != T:  # padded to whole sequence shards above
                mask, image = pad_time(mask, shards, False), pad_time(image, shards)
                deep = jnp.swapaxes(pad_time(jnp.swapaxes(deep, 0, 1), shards), 0, 1)
                visual = (mask, image, deep)
            x = jnp.where(mask[..., None], image.astype(x.dtype), x)
        x = rules.constrain(x, rules.HIDDEN)
        hidden, mixed_all, aux_all, new_caches = [x], [], [], []
        for i, layer in enumerate(self.layers):
            cache = None if caches is None else caches[i]
            seg_i = segments
            if step is not None and step.rope_offset and i >= 1:  # official decode quirk, see CacheStep
                seg_i = segments.replace(positions=segments.positions + step.rope_offset)
            x, mixed, aux, cache = layer(x, seg_i, deterministic, cache, step)
            hidden.append(x)
            if visual is not None and i < visual[2].shape[0]:
                x = x + visual[2][i].astype(x.dtype)  # deepstack: zero outside the image tokens
            mixed_all.append(mixed)
            aux_all.append(aux)
            new_caches.append(cache)
        if x.shape[1] != T:
            x, hidden, mixed_all = x[:, :T], [h[:, :T] for h in hidden], [m[:, :T] for m in mixed_all]
        return self.norm(x), hidden, mixed_all, jnp.stack(aux_all), None if caches is None else tuple(new_caches)

    def attend(self, x: jax.Array) -> jax.Array:
        """Tied output projection: ``x @ embeddings^T``."""
        return self.embeddings.attend(x)


class SpB2ForCausalLM(nn.Module):
    """SpikingBrain2.0 causal LM.

    ``model.apply({"params": params}, input_ids, attention_mask=None, ...)`` -> ``CausalLMOutput``.
    Pass ``rngs={"dropout": key}`` with ``deterministic=False`` for training-mode SWA dropout.

    How it runs is ``options`` (``spb2_jax.options.resolve_options``: dtypes, kernels, remat, decoding). The
    old keywords ``impl=``, ``dtype=``, ``param_dtype=`` still work: they are resolved here, once, into the
    options (giving both is an error).
    """

    config: SpB2Config
    options: ModelOptions | None = None
    impl: str | None = None
    dtype: Dtype | None = None
    param_dtype: Dtype | None = None

    @property
    def resolved_options(self) -> ModelOptions:
        """The options every layer below receives (resolved once from the fields above)."""
        return options_from(self.options, self.config, impl=self.impl, dtype=self.dtype,
                            param_dtype=self.param_dtype)

    def setup(self):
        c, o = self.config, self.resolved_options
        self.model = SpB2Model(c, o)
        if not c.tie_word_embeddings:
            self.lm_head = dense(c.vocab_size, "lm_head", c.initializer_range, axes=(rules.EMBED, rules.VOCAB),
                                 dtype=o.dtype, param_dtype=o.param_dtype,
                                 coding=o.coding if o.quantize_lm_head else "none", spike_k=o.spike_k)

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        *,
        segment_ids: jax.Array | None = None,
        deterministic: bool = True,
        output_hidden_states: bool = False,
        output_mixer_outputs: bool = False,
        output_logits: bool = True,
    ) -> CausalLMOutput:
        """Forward pass.

        Args:
          input_ids: ``[B, T]`` int token ids.
          attention_mask: optional ``[B, T]`` 0/1 HF padding mask (left padding); padded tokens are not mixed
            with real ones and each row's real tokens start at position 0 with zero recurrent state.
          segment_ids: optional ``[B, T]`` packed-sequence ids (0 = padding); tokens never mix across segments.
          deterministic: False enables training-mode SWA dropout (needs the ``"dropout"`` rng).
          output_hidden_states, output_mixer_outputs: also return per-layer activations.
          output_logits: False skips the ``[B, T, V]`` logits (training computes the loss from
            ``last_hidden_state`` in sequence tiles, ``spb2_jax.loss``).
        """
        segments = build_segments(input_ids, attention_mask, segment_ids)
        normed, hidden, mixed, aux, _ = self.model(input_ids, segments, deterministic)
        return CausalLMOutput(
            logits=self.head(normed) if output_logits else None,
            aux_losses=aux,
            last_hidden_state=normed,
            hidden_states=tuple(hidden[:-1]) + (normed,) if output_hidden_states else None,
            last_block_output=hidden[-1] if output_hidden_states else None,
            mixer_outputs=tuple(mixed) if output_mixer_outputs else None,
        )


    def head(self, normed: jax.Array) -> jax.Array:
        """Output projection of the final normed hidden states -> logits ``[B, T, V]``."""
        if self.config.tie_word_embeddings:
            return self.model.attend(normed)
        return self.lm_head(normed)

    def extend(self, input_ids: jax.Array, caches: tuple, step, all_logits: bool = True):
        """Add ``input_ids [B, T]`` to the decoding caches (``spb2_jax.generate`` is the user-facing API).

        Args:
          caches: per-layer caches (``spb2_jax.layers.cache``); step: their ``CacheStep`` (real tokens, positions).
          all_logits: logits of every token ``[B, T, V]``; False: only of each row's last real token ``[B, 1, V]``.
        Returns:
          ``(logits, updated caches)``.
        """
        seg = step.valid.astype(jnp.int32)
        segments = Segments(ids=seg, labels=seg, positions=jnp.maximum(step.positions, 0))
        normed, _, _, _, caches = self.model(input_ids, segments, True, caches, step)
        if not all_logits:
            T = input_ids.shape[1]
            last = jnp.max(jnp.where(step.valid, jnp.arange(T), 0), axis=1)  # [B]
            normed = jnp.take_along_axis(normed, last[:, None, None], axis=1)
        return self.head(normed), caches


def causal_lm_loss(
    logits: jax.Array, labels: jax.Array, aux_losses: jax.Array, aux_loss_coef: float,
) -> dict[str, jax.Array]:
    """The official loss: CE of ``logits[:, t]`` against ``labels[:, t + 1]`` (ignore index -100, mean over
    non-ignored positions; the last position is ignored) plus ``aux_loss_coef * sum(aux_losses)``.

    Returns ``{"loss", "ce_loss", "aux_loss"}`` float32 scalars.
    """
    if labels.shape != logits.shape[:2]:
        raise ValueError(f"labels shape {labels.shape} != logits batch/time shape {logits.shape[:2]}")
    shifted = jnp.concatenate([labels[:, 1:], jnp.full_like(labels[:, :1], IGNORE_INDEX)], axis=1)
    valid = shifted != IGNORE_INDEX
    acc = acc_dtype(logits)
    logp = jax.nn.log_softmax(logits.astype(acc), axis=-1)
    nll = -jnp.take_along_axis(logp, jnp.where(valid, shifted, 0)[..., None], axis=-1)[..., 0]
    ce = jnp.sum(jnp.where(valid, nll, 0.0)) / jnp.maximum(valid.sum(), 1)
    aux = jnp.sum(aux_losses.astype(acc))
    return {"loss": ce + aux_loss_coef * aux, "ce_loss": ce, "aux_loss": aux}


def head_kernel(params: Any, config: SpB2Config) -> jax.Array:
    """The output projection as a ``[D, V]`` kernel: ``lm_head/kernel``, or the embeddings transposed when tied."""
    if config.tie_word_embeddings:
        return params["model"]["embeddings"]["embedding"].T
    return params["lm_head"]["kernel"]


def loss_fn(
    params: Any,
    config: SpB2Config,
    input_ids: jax.Array,
    labels: jax.Array,
    attention_mask: jax.Array | None = None,
    *,
    segment_ids: jax.Array | None = None,
    dropout_rng: jax.Array | None = None,
    options: ModelOptions | None = None,
    dtype: Dtype | None = None,
    impl: str | None = None,
    tile_size: int = 512,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Scalar training loss and its parts (``causal_lm_loss``'s contract) without ``[B, T, V]`` logits: the
    cross-entropy is computed from the final hidden states and the head in sequence tiles of ``tile_size``
    (``spb2_jax.loss``). SWA dropout is on when ``dropout_rng`` is given. ``options`` (or the old ``dtype`` /
    ``impl`` keywords): how the model runs."""
    model = SpB2ForCausalLM(config, options_from(options, config, impl=impl, dtype=dtype))
    out = model.apply({"params": params}, input_ids, attention_mask, segment_ids=segment_ids,
                      deterministic=dropout_rng is None, output_logits=False,
                      rngs=None if dropout_rng is None else {"dropout": dropout_rng})
    kernel = head_kernel(params, config).astype(model.resolved_options.dtype)
    parts = causal_lm_loss_tiled(out.last_hidden_state, kernel, labels, out.aux_losses, config.aux_loss_coef,
                                 tile_size=tile_size)
    return parts["loss"], parts


def init_params(config: SpB2Config, rng: jax.Array, *, param_dtype: Dtype = jnp.float32) -> Any:
    """Randomly initialised params (official-style init) for ``config``: a pytree of plain arrays (the logical
    axis names are in ``logical_axes(config)``)."""
    return nn.meta.unbox(_init_boxed(config, rng, param_dtype))


def _init_boxed(config: SpB2Config, rng: jax.Array, param_dtype: Dtype) -> Any:
    model = SpB2ForCausalLM(config, param_dtype=param_dtype)
    return model.init(rng, jnp.zeros((1, 1), jnp.int32))["params"]


def abstract_params(config: SpB2Config, *, param_dtype: Dtype = jnp.float32) -> Any:
    """``jax.ShapeDtypeStruct`` tree of the params (no memory allocated)."""
    return jax.eval_shape(lambda k: init_params(config, k, param_dtype=param_dtype), jax.random.key(0))


def logical_axes(config: SpB2Config) -> Any:
    """The params tree with, at every leaf, its ``PartitionSpec`` of logical axis names (``spb2_jax.parallel.rules``
    maps them to mesh axes). Abstract: nothing is allocated."""
    boxed = jax.eval_shape(lambda k: _init_boxed(config, k, jnp.float32), jax.random.key(0))
    return nn.get_partition_spec(boxed)
