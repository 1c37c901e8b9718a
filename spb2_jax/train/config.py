"""Training configuration: one validated, frozen dataclass tree read from YAML plus ``key.sub=value`` overrides.

    python -m spb2_jax.train --config configs/train/tiny-text.yaml steps=50 optimizer.lr=1e-3 run_dir=/tmp/run

Sections: ``model`` (preset config.json or HF checkpoint, dtypes, remat, kernels), ``data`` (source, packing,
batch, microbatches), ``optimizer`` (AdamW, schedule, clipping), ``eval`` (held-out loss every N steps),
``distill`` (a frozen teacher: KL / CE / alignment weights, training only the new parameters) and the
run-level fields ``run_dir``, ``steps``, ``seed``, ``checkpoint_every``, ``keep_checkpoints``, ``log_every``,
``mesh``. Every error names the field (dotted path) and the bad value: unknown keys, wrong types, out-of-range
numbers, unknown choices, a batch that the mesh or the microbatch count does not divide.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from typing import Any, Mapping

import yaml

SCHEDULES = ("cosine", "linear", "constant")
FORMATS = ("text", "jsonl", "chat", "npy", "arrayrecord")
DTYPES = ("float32", "bfloat16")
REMATS = ("none", "full", "save_dots", "save_mixer_outputs")


class ConfigError(ValueError):
    """A bad training config: the message names the field and the value."""


@dataclasses.dataclass(frozen=True)
class ModelSection:
    """What model to train and how it runs.

    preset: a model ``config.json`` (random init) — or checkpoint: an HF checkpoint directory (its config, weights
    and tokenizer). ``init_from`` (CLI ``--init-from``): params only, from an HF checkpoint or a run directory.
    dtype: compute dtype; master params and optimizer state stay float32. remat: per-block rematerialisation.
    impl: op implementations (``spb2_jax.options``).
    """

    preset: str | None = None
    checkpoint: str | None = None
    init_from: str | None = None
    dtype: str = "float32"
    remat: str = "none"
    impl: str = "xla"


@dataclasses.dataclass(frozen=True)
class DataSection:
    """Training data (``spb2_jax.train.data``).

    source: a file, a directory (every file with an ``extensions`` suffix, recursively) or ``"python-stdlib"``
    (the ``.py`` files of this Python's standard library: text every machine has) or ``"recall"`` (synthetic
    multi-query associative recall). format: text | jsonl (``field``) | chat (jsonl, ``field`` holds a list of
    ``{"role", "content"}`` messages; ChatML, loss on assistant turns only) | npy (pre-tokenised 1-D token arrays) |
    arrayrecord (pre-tokenised: one record of int32 tokens per document).
    tokenizer: a ``tokenizer.json`` (default: the checkpoint's, else the tiny byte-level one shipped with the
    package). Documents are split into pieces of at most ``seq_len`` tokens and packed into rows of ``seq_len``
    with segment ids; ``batch_size`` rows per step, split into ``microbatches`` accumulated in one update.
    ``eval_documents`` documents are held out (never trained on) for the eval. ``recall_*``: the recall task
    (``data.recall_example``): pairs and queries (0: each key once) of a sequence, how many ids keys and values are
    each drawn from (0: half of the ids above the special tokens), and how many training examples come first as
    short ones (a curriculum; held-out sequences are always full-length). The recall stream is never shuffled.
    """

    source: str = "python-stdlib"
    format: str = "text"
    field: str = "text"
    extensions: tuple[str, ...] = (".py",)
    tokenizer: str | None = None
    seq_len: int = 256
    batch_size: int = 8
    microbatches: int = 1
    shuffle: bool = True
    max_documents: int = 0
    eval_documents: int = 16
    recall_pairs: int = 16
    recall_queries: int = 16
    recall_vocab: int = 0
    recall_ramp_examples: int = 0


@dataclasses.dataclass(frozen=True)
class OptimizerSection:
    """optax AdamW with a learning-rate schedule and global-norm clipping (``spb2_jax.train.optim``); weight decay
    skips norms, biases, ``A_log`` and ``dt_bias``."""

    lr: float = 1e-3
    schedule: str = "cosine"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    clip_norm: float = 1.0


@dataclasses.dataclass(frozen=True)
class EvalSection:
    """Held-out loss every ``every`` steps (0 = never) over ``batches`` batches of the held-out documents;
    ``at_start``: also before the first step of a fresh run (logged as step 0: where distillation starts from)."""

    every: int = 0
    batches: int = 2
    at_start: bool = False


@dataclasses.dataclass(frozen=True)
class DistillSection:
    """Distillation from a frozen teacher (``spb2_jax.train.distill``; T2H, issue "Transformer-to-Hybrid").

    teacher: an HF checkpoint directory (Qwen3 or SpB2) with the student's vocabulary; None: no distillation.
    The loss becomes ``kl_weight * KL(teacher || student) at temperature + ce_weight * CE + align_weight *
    alignment + aux_loss_coef * aux`` (KL and CE per target token, alignment per real token).
    train_only_new: update only the parameters T2H conversion created (``spb2_jax.t2h.new_param_mask``); the
    copied ones stay as the teacher had them (the alignment stage).
    """

    teacher: str | None = None
    temperature: float = 1.0
    kl_weight: float = 1.0
    ce_weight: float = 0.0
    align_weight: float = 0.0
    train_only_new: bool = False


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The whole run (module docstring). ``mesh``: a ``spb2_jax.parallel.make_mesh`` spec (``""`` = one device).
    ``sample_prompts``: after the last step, continue each prompt by ``sample_tokens`` tokens at
    ``sample_temperature`` (0 = greedy) into ``RUN_DIR/samples.txt``."""

    run_dir: str = "runs/default"
    steps: int = 100
    seed: int = 0
    checkpoint_every: int = 50
    keep_checkpoints: int = 3
    log_every: int = 1
    mesh: str = ""
    loss_tile: int = 512
    sample_prompts: tuple[str, ...] = ()
    sample_tokens: int = 48
    sample_temperature: float = 0.8
    model: ModelSection = ModelSection()
    data: DataSection = DataSection()
    optimizer: OptimizerSection = OptimizerSection()
    eval: EvalSection = EvalSection()
    distill: DistillSection = DistillSection()

    def validate(self) -> "TrainConfig":
        """Range and choice checks (types are checked when the config is built); returns self."""
        m, d, o = self.model, self.data, self.optimizer
        _positive(self, "steps", "checkpoint_every", "keep_checkpoints", "log_every", "loss_tile")
        _nonneg(self, "seed", "sample_tokens", "sample_temperature")
        if (m.preset is None) == (m.checkpoint is None):
            raise ConfigError(f"model: give exactly one of model.preset and model.checkpoint, got "
                              f"preset={m.preset!r} checkpoint={m.checkpoint!r}")
        _choice("model.dtype", m.dtype, DTYPES)
        _choice("model.remat", m.remat, REMATS)
        _choice("model.impl", m.impl, ("xla", "pallas", "reference"))
        _choice("data.format", d.format, FORMATS)
        _positive(d, "seq_len", "batch_size", "microbatches", prefix="data.")
        _nonneg(d, "max_documents", "eval_documents", "recall_pairs", "recall_queries", "recall_vocab",
                "recall_ramp_examples", prefix="data.")
        if d.seq_len < 2:
            raise ConfigError(f"data.seq_len={d.seq_len} must be at least 2 (a token and its successor)")
        if d.batch_size % d.microbatches:
            raise ConfigError(f"data.batch_size={d.batch_size} is not a multiple of data.microbatches="
                              f"{d.microbatches}")
        _choice("optimizer.schedule", o.schedule, SCHEDULES)
        _positive(o, "lr", "eps", "clip_norm", prefix="optimizer.")
        _nonneg(o, "warmup_steps", "weight_decay", "min_lr_ratio", prefix="optimizer.")
        for name in ("b1", "b2"):
            if not 0.0 <= getattr(o, name) < 1.0:
                raise ConfigError(f"optimizer.{name}={getattr(o, name)} must be in [0, 1)")
        if o.min_lr_ratio > 1.0:
            raise ConfigError(f"optimizer.min_lr_ratio={o.min_lr_ratio} must be in [0, 1]")
        _nonneg(self.eval, "every", prefix="eval.")
        _positive(self.eval, "batches", prefix="eval.")
        k = self.distill
        _positive(k, "temperature", prefix="distill.")
        _nonneg(k, "kl_weight", "ce_weight", "align_weight", prefix="distill.")
        if k.teacher is None and (k.train_only_new or k.align_weight):
            raise ConfigError(f"distill.teacher is required for distill.align_weight={k.align_weight} / "
                              f"distill.train_only_new={k.train_only_new}")
        if k.teacher is not None and not (k.kl_weight or k.ce_weight or k.align_weight):
            raise ConfigError("distill: kl_weight, ce_weight and align_weight are all 0: nothing to train on")
        return self


def _positive(obj, *names, prefix=""):
    for name in names:
        if getattr(obj, name) <= 0:
            raise ConfigError(f"{prefix}{name}={getattr(obj, name)!r} must be positive")


def _nonneg(obj, *names, prefix=""):
    for name in names:
        if getattr(obj, name) < 0:
            raise ConfigError(f"{prefix}{name}={getattr(obj, name)!r} must be >= 0")


def _choice(name, value, choices):
    if value not in choices:
        raise ConfigError(f"{name}={value!r} must be one of {choices}")


# ----------------------------------------------------------------------------------------------- building

def _coerce(path: str, value: Any, kind: Any) -> Any:
    """``value`` as the dataclass field type ``kind`` (str / int / float / bool / tuple[str, ...] / optional)."""
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(kind) if a is not type(None)]
        if value is None or value == "null" or value == "None":
            return None
        return _coerce(path, value, options[0])
    if origin is tuple:
        if isinstance(value, str):
            value = [v for v in value.split(",") if v] if value else []
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}={value!r} must be a list")
        return tuple(_coerce(f"{path}[{i}]", v, typing.get_args(kind)[0]) for i, v in enumerate(value))
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{path}={value!r} must be true or false")
    if kind is int:
        if isinstance(value, bool):
            raise ConfigError(f"{path}={value!r} must be an integer")
        try:
            as_float = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{path}={value!r} must be an integer") from None
        if as_float != int(as_float):
            raise ConfigError(f"{path}={value!r} must be an integer")
        return int(as_float)
    if kind is float:
        if isinstance(value, bool):
            raise ConfigError(f"{path}={value!r} must be a number")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{path}={value!r} must be a number") from None
    if kind is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{path}={value!r} must be a string")
        return str(value)
    raise TypeError(f"unsupported field type {kind} at {path}")


def _build(cls, data: Mapping[str, Any], prefix: str = ""):
    if not isinstance(data, Mapping):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"unknown key {prefix}{unknown[0]}; known keys of {prefix.rstrip('.') or 'the config'}: "
                          f"{sorted(fields)}")
    values = {}
    for name, value in data.items():
        kind = hints[name]
        if dataclasses.is_dataclass(kind):
            values[name] = _build(kind, value or {}, f"{prefix}{name}.")
        else:
            values[name] = _coerce(f"{prefix}{name}", value, kind)
    return cls(**values)


def _set_dotted(tree: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {key}: {part} is not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(items: list[str]) -> dict:
    """``["a.b=1", "steps=5"]`` -> nested dict of YAML-parsed values (``a.b=1`` gives the int 1)."""
    tree: dict = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value (e.g. steps=100 or optimizer.lr=3e-4)")
        key, raw = item.split("=", 1)
        if not key or any(not p for p in key.split(".")):
            raise ConfigError(f"override {item!r} has an empty key")
        try:
            value = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError:
            value = raw
        _set_dotted(tree, key, value)
    return tree


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """The validated ``TrainConfig`` of a YAML file (relative paths in it are taken relative to the current
    directory) with ``key.sub=value`` overrides applied on top. Raises ``ConfigError`` naming the field."""
    data: dict = {}
    if path is not None:
        try:
            with open(path) as f:
                data = yaml.safe_load(f) or {}
        except FileNotFoundError:
            raise ConfigError(f"--config {path}: no such file") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"--config {path}: not valid YAML ({e})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"--config {path}: the top level must be a mapping, got {type(data).__name__}")
    data = _merge(data, parse_overrides(overrides or []))
    return _build(TrainConfig, data).validate()


def to_dict(config: TrainConfig) -> dict:
    """Plain nested dict (tuples as lists) for YAML / JSON (the run directory keeps ``config.yaml``)."""

    def plain(x):
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [plain(v) for v in x]
        return x

    return plain(dataclasses.asdict(config))
