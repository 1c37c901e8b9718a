"""Training: ``python -m spb2_jax.train --config configs/train/NAME.yaml [key.sub=value ...]``.

Modules: ``config`` (validated YAML + overrides), ``data`` (grain: sources, packing, resumable iterator),
``optim`` (AdamW, schedules, decay mask), ``step`` (accumulation, loss, guard), ``checkpoints`` (orbax),
``metrics`` (JSONL, TensorBoard, progress, loss curve), ``flops`` (MFU), ``loop`` (the run).
"""

from spb2_jax.train.config import ConfigError, TrainConfig, load_config
from spb2_jax.train.loop import NonFiniteLoss, RunResult, TrainError, train
from spb2_jax.train.step import TrainState, make_train_step

__all__ = ["ConfigError", "NonFiniteLoss", "RunResult", "TrainConfig", "TrainError", "TrainState", "load_config",
           "make_train_step", "train"]
