"""Any checkpoint this library loads, by its ``config.json`` ``model_type``: SpB2 (``sse_swa_moba``) or Qwen3 (as
the equal all-full-attention SpB2 model, ``spb2_jax.checkpoint.qwen3``)."""

from __future__ import annotations

import json
import os
from typing import Any

from spb2_jax.checkpoint.hf import read_params
from spb2_jax.checkpoint.qwen3 import QWEN3_MODEL_TYPE, checkpoint_model_type, qwen3_config, spb2_name
from spb2_jax.config import SpB2Config


def config_of(path: str | os.PathLike) -> SpB2Config:
    """The ``SpB2Config`` of a checkpoint directory (a Qwen3 one: its all-full-attention equal)."""
    if checkpoint_model_type(path) == QWEN3_MODEL_TYPE:
        with open(os.path.join(os.fspath(path), "config.json")) as f:
            return qwen3_config(json.load(f))
    return SpB2Config.from_pretrained(path)


def load_checkpoint(path: str | os.PathLike, dtype: Any = None, *, strict: bool = True, progress: bool = True,
                    shardings: Any = None) -> tuple[SpB2Config, Any]:
    """``(config, params)`` of a SpB2 or Qwen3 HF checkpoint directory (arguments as ``spb2_jax.load_hf``)."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint directory {path!r} does not exist")
    config = config_of(path)
    rename = spb2_name if checkpoint_model_type(path) == QWEN3_MODEL_TYPE else None
    return config, read_params(path, config, rename=rename, dtype=dtype, strict=strict, progress=progress,
                               shardings=shardings)
