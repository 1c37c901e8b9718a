"""Transformer-to-Hybrid (T2H): convert a Qwen3 teacher into a SpikingBrain2.0 hybrid (``convert``), then distill
(``spb2_jax.train`` with a ``distill`` section). CLI: ``python -m spb2_jax.t2h --qwen3 DIR --config ... --out DIR``."""

from spb2_jax.t2h.convert import (
    COPIED,
    NEW,
    REPEATED,
    ConversionRow,
    check_compatible,
    config_changes,
    convert,
    new_param_mask,
)

__all__ = ["COPIED", "NEW", "REPEATED", "ConversionRow", "check_compatible", "config_changes", "convert",
           "new_param_mask"]
