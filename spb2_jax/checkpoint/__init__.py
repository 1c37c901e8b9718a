"""HF checkpoint import/export (safetensors only; pickles are never read)."""

from spb2_jax.checkpoint.hf import (
    CheckpointError,
    TensorInfo,
    check_checkpoint,
    hf_param_spec,
    load_hf,
    read_params,
    parse_size,
    plan_shards,
    read_safetensors_header,
    save_hf,
    shard_filenames,
    write_index,
)
from spb2_jax.checkpoint.names import flax_path_to_hf, hf_shape
from spb2_jax.checkpoint.qwen3 import load_qwen3, qwen3_config, save_qwen3

__all__ = [
    "CheckpointError", "TensorInfo", "check_checkpoint", "flax_path_to_hf", "hf_param_spec", "hf_shape", "load_hf",
    "load_qwen3", "parse_size", "plan_shards", "qwen3_config", "read_params",
    "save_qwen3", "read_safetensors_header", "save_hf", "shard_filenames", "write_index",
]
