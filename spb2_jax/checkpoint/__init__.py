"""HF checkpoint import/export (safetensors only; pickles are never read)."""

from spb2_jax.checkpoint.hf import (
    CheckpointError,
    TensorInfo,
    check_checkpoint,
    hf_param_spec,
    load_hf,
    parse_size,
    plan_shards,
    read_safetensors_header,
    save_hf,
    shard_filenames,
    write_index,
)
from spb2_jax.checkpoint.names import flax_path_to_hf, hf_shape

__all__ = [
    "CheckpointError", "TensorInfo", "check_checkpoint", "flax_path_to_hf", "hf_param_spec", "hf_shape", "load_hf",
    "parse_size", "plan_shards", "read_safetensors_header", "save_hf", "shard_filenames", "write_index",
]
