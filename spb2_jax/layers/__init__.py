"""Flax linen layers whose module names mirror the HF SpikingBrain2.0 module names."""

from spb2_jax.layers.attention import AttentionMixer
from spb2_jax.layers.block import DecoderBlock
from spb2_jax.layers.common import GatedMLP, RMSNorm
from spb2_jax.layers.sse_swa import SSESWAMixer

__all__ = ["AttentionMixer", "DecoderBlock", "GatedMLP", "RMSNorm", "SSESWAMixer"]
