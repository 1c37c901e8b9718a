"""One decoder block (HF ``SSESWAMoBABlock``): pre-norm token mixer and gated MLP, both residual; and the
rematerialisation policies of ``ModelOptions.remat``.

Remat policies (``remat_block``; what the backward pass keeps from the forward of each block):

- ``none``: everything autodiff keeps (no rematerialisation).
- ``full``: nothing but the block's inputs; the block's forward is recomputed in the backward pass.
- ``save_dots``: the results of matmuls without batch dimensions (the projections), recompute the rest.
- ``save_mixer_outputs``: the token mixer's output (tagged ``"mixer_output"`` with ``checkpoint_name``); the
  projections and the MLP are recomputed, the expensive token mixing is not.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from spb2_jax.config import LayerKind, SpB2Config
from spb2_jax.layers.attention import AttentionMixer
from spb2_jax.layers.cache import CacheStep
from spb2_jax.layers.common import GatedMLP, RMSNorm
from spb2_jax.layers.sse_swa import SSESWAMixer
from spb2_jax.ops.dtypes import acc_dtype
from spb2_jax.ops.segments import Segments
from spb2_jax.options import ModelOptions
from spb2_jax.parallel import rules

MIXER_OUTPUT = "mixer_output"  # checkpoint_name of the token mixer's output

REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "save_mixer_outputs": jax.checkpoint_policies.save_only_these_names(MIXER_OUTPUT),
}


class DecoderBlock(nn.Module):
    """``h = x + mixer(rms(x)); y = h + mlp(rms(h))``.

    Returns ``(y, mixer_output, aux_loss, cache)``; the mixer output is zero at padding tokens (segment 0), as in
    the official unpad/pad path. ``cache``: this layer's updated cache when one is given (decoding), else None.
    """

    config: SpB2Config
    layer_idx: int
    options: ModelOptions = ModelOptions()

    @nn.compact
    def __call__(self, x: jax.Array, segments: Segments, deterministic: bool = True, cache: Any = None,
                 step: CacheStep | None = None) -> tuple[jax.Array, jax.Array, jax.Array, Any]:
        c, o = self.config, self.options
        kind = c.layer_kind(self.layer_idx)
        kw = dict(dtype=o.dtype, param_dtype=o.param_dtype)
        x = rules.constrain(x, rules.HIDDEN)  # [B, T, D]
        h = RMSNorm(eps=c.norm_eps, name="attn_norm", **kw)(x)
        if kind in (LayerKind.FULL, LayerKind.MOBA):
            mixed, cache = AttentionMixer(c, kind, o, name="attn")(h, segments, cache, step)
            aux = jnp.zeros((), acc_dtype(x))
        else:
            mixed, aux, cache = SSESWAMixer(c, kind, o, name="attn")(h, segments, deterministic, cache, step)
        mixed = mixed * segments.real[..., None].astype(mixed.dtype)
        mixed = checkpoint_name(mixed, MIXER_OUTPUT)
        h = x + mixed
        m = RMSNorm(eps=c.norm_eps, name="mlp_norm", **kw)(h)
        y = h + GatedMLP(c.hidden_size, c.mlp_intermediate_size, c.initializer_range, name="mlp", coding=o.coding,
                         spike_k=o.spike_k, **kw)(m)
        return rules.constrain(y, rules.HIDDEN), mixed, aux, cache


def remat_block(policy: str) -> type[DecoderBlock]:
    """``DecoderBlock`` under ``nn.remat`` with a named policy (module docstring); ``"none"``: the block as is.

    ``deterministic`` (argument 3, counting the module) is static. Decoding (a cache) never uses remat."""
    if policy == "none":
        return DecoderBlock
    if policy not in REMAT_POLICIES:
        raise ValueError(f"remat={policy!r} is not one of {('none',) + tuple(REMAT_POLICIES)}")
    return nn.remat(DecoderBlock, policy=REMAT_POLICIES[policy], static_argnums=(3,))
