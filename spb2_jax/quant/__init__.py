"""Activation codings (``ModelOptions.coding``): an FP8 path and SpikingBrain's INT8-Spiking path.

- ``quantize(params, config, coding, lm_head=False)``: the quantised params the coded model reads
  (``resolve_options(config, coding=...)``).
- INT8-Spiking counts and the exact spike-train emulator: ``spike_counts(x, k=3.0) -> (n, v_th)``,
  ``encode_spikes(n, scheme) -> s [T, *n.shape]``, ``decode_spikes(s, scheme) -> n``,
  ``spike_matmul(s, w_int8, scheme) -> int32``; ``scheme`` one of ``"binary"``, ``"ternary"``, ``"bitwise"``,
  ``"twos_complement"`` (``SCHEMES``).
"""

from spb2_jax.ops.spikes import (
    SCHEMES,
    clip_rate,
    decode_spikes,
    encode_spikes,
    num_steps,
    spike_counts,
    spike_matmul,
    step_weights,
    threshold,
)
from spb2_jax.quant.quantize import quantize, quantized_layers

__all__ = ["SCHEMES", "clip_rate", "decode_spikes", "encode_spikes", "num_steps", "quantize", "quantized_layers",
           "spike_counts", "spike_matmul", "step_weights", "threshold"]
