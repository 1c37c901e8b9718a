"""Activation codings: INT8-Spiking (SpikingBrain's integer spike counts and an exact spike-train emulator).

Public: ``spike_counts(x, k=3.0) -> (n, v_th)``, ``encode_spikes(n, scheme) -> s [T, *n.shape]``,
``decode_spikes(s, scheme) -> n``, ``spike_matmul(s, w_int8, scheme) -> int32``; ``scheme`` one of
``"binary"``, ``"ternary"``, ``"bitwise"``, ``"twos_complement"`` (``SCHEMES``).
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

__all__ = ["SCHEMES", "clip_rate", "decode_spikes", "encode_spikes", "num_steps", "spike_counts", "spike_matmul",
           "step_weights", "threshold"]
