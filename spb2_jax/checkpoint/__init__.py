"""HF checkpoint import/export (safetensors only)."""

from spb2_jax.checkpoint.hf import CheckpointError, check_checkpoint, hf_param_spec, load_hf, save_hf
from spb2_jax.checkpoint.names import flax_path_to_hf

__all__ = ["CheckpointError", "check_checkpoint", "flax_path_to_hf", "hf_param_spec", "load_hf", "save_hf"]
