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
from spb2_jax.layers.block import DecoderBlock
from spb2_jax.layers.common import Dtype, RMSNorm
from spb2_jax.ops import dispatch
from spb2_jax.ops.dtypes import acc_dtype
from spb2_jax.ops.segments import segment_positions

IGNORE_INDEX = -100


@flax.struct.dataclass
class CausalLMOutput:
    """Outputs of ``SpB2ForCausalLM``.

    Attributes:
      logits: ``[B, T, V]`` (float32 unless the compute dtype is lower).
      aux_losses: ``[L]`` float32 per-layer SSE load-balance losses (0 for attention layers).
      hidden_states: with ``output_hidden_states``: tuple of L+1 ``[B, T, D]`` in the HF convention
        (``[0]`` embeddings, ``[i]`` output of block i-1, ``[L]`` last block output AFTER the final norm).
      last_block_output: with ``output_hidden_states``: raw output of the last block (before the final norm).
      mixer_outputs: with ``output_mixer_outputs``: tuple of L token-mixer outputs (before the residual add);
        what the official model returns as ``attentions``.
    """

    logits: jax.Array
    aux_losses: jax.Array
    hidden_states: tuple[jax.Array, ...] | None = None
    last_block_output: jax.Array | None = None
    mixer_outputs: tuple[jax.Array, ...] | None = None


def segments_and_positions(
    input_ids: jax.Array, attention_mask: jax.Array | None, segment_ids: jax.Array | None,
) -> tuple[jax.Array, jax.Array]:
    """``segment_ids [B, T]`` (0 = padding) from an HF ``attention_mask`` and/or packed segment ids, and the
    RoPE positions (0 at the first real token of each segment)."""
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
    return seg, segment_positions(seg)


class SpB2Model(nn.Module):
    """Embeddings, the decoder blocks and the final norm (HF ``SSESWAMoBAModel``)."""

    config: SpB2Config
    impl: str = dispatch.DEFAULT_IMPL
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        c = self.config
        self.embeddings = nn.Embed(c.vocab_size, c.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype,
                                   embedding_init=nn.initializers.normal(c.initializer_range))
        self.layers = [DecoderBlock(c, i, impl=dispatch.check_impl(self.impl), dtype=self.dtype,
                                    param_dtype=self.param_dtype)
                       for i in range(c.num_hidden_layers)]
        self.norm = RMSNorm(eps=c.norm_eps, dtype=self.dtype, param_dtype=self.param_dtype)

    def __call__(self, input_ids, segment_ids, positions, deterministic=True, caches=None, step=None):
        """Returns ``(final normed hidden, per-block outputs, per-block mixer outputs, aux [L], caches)``.

        With ``caches`` (one per layer) and ``step`` (``spb2_jax.layers.cache.CacheStep``) the tokens are added to
        the caches; the returned ``caches`` are the updated ones (None without).
        """
        x = self.embeddings(input_ids)  # [B, T, D]
        hidden, mixed_all, aux_all, new_caches = [x], [], [], []
        for i, layer in enumerate(self.layers):
            cache = None if caches is None else caches[i]
            rope_pos = positions
            if step is not None and step.rope_offset and i >= 1:
                rope_pos = positions + step.rope_offset  # official decode quirk, see CacheStep
            x, mixed, aux, cache = layer(x, segment_ids, rope_pos, deterministic, cache, step)
            hidden.append(x)
            mixed_all.append(mixed)
            aux_all.append(aux)
            new_caches.append(cache)
        return self.norm(x), hidden, mixed_all, jnp.stack(aux_all), None if caches is None else tuple(new_caches)

    def attend(self, x: jax.Array) -> jax.Array:
        """Tied output projection: ``x @ embeddings^T``."""
        return self.embeddings.attend(x)


class SpB2ForCausalLM(nn.Module):
    """SpikingBrain2.0 causal LM.

    ``model.apply({"params": params}, input_ids, attention_mask=None, ...)`` -> ``CausalLMOutput``.
    Pass ``rngs={"dropout": key}`` with ``deterministic=False`` for training-mode SWA dropout.
    ``impl`` picks the token-mixer implementation (``spb2_jax.ops.dispatch``): ``"xla"`` (default: chunked /
    blockwise, linear in T), ``"pallas"`` (Pallas kernels; interpret mode on CPU) or ``"reference"`` (per-token
    scans and dense masks; see dispatch.py).
    """

    config: SpB2Config
    impl: str = dispatch.DEFAULT_IMPL
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        c = self.config
        self.model = SpB2Model(c, impl=self.impl, dtype=self.dtype, param_dtype=self.param_dtype)
        if not c.tie_word_embeddings:
            self.lm_head = nn.Dense(c.vocab_size, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
                                    kernel_init=nn.initializers.normal(c.initializer_range))

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        *,
        segment_ids: jax.Array | None = None,
        deterministic: bool = True,
        output_hidden_states: bool = False,
        output_mixer_outputs: bool = False,
    ) -> CausalLMOutput:
        """Forward pass.

        Args:
          input_ids: ``[B, T]`` int token ids.
          attention_mask: optional ``[B, T]`` 0/1 HF padding mask (left padding); padded tokens are not mixed
            with real ones and each row's real tokens start at position 0 with zero recurrent state.
          segment_ids: optional ``[B, T]`` packed-sequence ids (0 = padding); tokens never mix across segments.
          deterministic: False enables training-mode SWA dropout (needs the ``"dropout"`` rng).
          output_hidden_states, output_mixer_outputs: also return per-layer activations.
        """
        seg, pos = segments_and_positions(input_ids, attention_mask, segment_ids)
        normed, hidden, mixed, aux, _ = self.model(input_ids, seg, pos, deterministic)
        logits = self.head(normed)
        return CausalLMOutput(
            logits=logits,
            aux_losses=aux,
            hidden_states=tuple(hidden[:-1]) + (normed,) if output_hidden_states else None,
            last_block_output=hidden[-1] if output_hidden_states else None,
            mixer_outputs=tuple(mixed) if output_mixer_outputs else None,
        )


    def head(self, normed: jax.Array) -> jax.Array:
        """Output projection of the final normed hidden states -> logits."""
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
        normed, _, _, _, caches = self.model(input_ids, seg, jnp.maximum(step.positions, 0), True, caches, step)
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


def loss_fn(
    params: Any,
    config: SpB2Config,
    input_ids: jax.Array,
    labels: jax.Array,
    attention_mask: jax.Array | None = None,
    *,
    segment_ids: jax.Array | None = None,
    dropout_rng: jax.Array | None = None,
    dtype: Dtype = jnp.float32,
    impl: str = dispatch.DEFAULT_IMPL,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Scalar training loss and its parts; SWA dropout is on when ``dropout_rng`` is given."""
    model = SpB2ForCausalLM(config, impl=impl, dtype=dtype)
    out = model.apply({"params": params}, input_ids, attention_mask, segment_ids=segment_ids,
                      deterministic=dropout_rng is None,
                      rngs=None if dropout_rng is None else {"dropout": dropout_rng})
    parts = causal_lm_loss(out.logits, labels, out.aux_losses, config.aux_loss_coef)
    return parts["loss"], parts


def init_params(config: SpB2Config, rng: jax.Array, *, param_dtype: Dtype = jnp.float32) -> Any:
    """Randomly initialised params (official-style init) for ``config``."""
    model = SpB2ForCausalLM(config, param_dtype=param_dtype)
    return model.init(rng, jnp.zeros((1, 1), jnp.int32))["params"]


def abstract_params(config: SpB2Config, *, param_dtype: Dtype = jnp.float32) -> Any:
    """``jax.ShapeDtypeStruct`` tree of the params (no memory allocated)."""
    return jax.eval_shape(lambda k: init_params(config, k, param_dtype=param_dtype), jax.random.key(0))
