"""The training run: set up (checks before step 0), resume, step, log, checkpoint, stop cleanly.

``train(config)`` is what ``python -m spb2_jax.train`` calls. Order of business:

1. Checks that need no compute, each failing with one message (``TrainError``) before step 0: the run directory
   is writable; the mesh spec parses and its devices exist; the batch divides over the mesh's batch shards and
   the microbatches; the model source exists; a distillation teacher exists and fits the student (vocabulary;
   depth and width when aligning).
2. Model: ``model.preset`` (random init from ``seed``) or ``model.checkpoint`` (HF), optionally params from
   ``model.init_from`` (an HF checkpoint or another run directory); master params float32, placed on the mesh by
   the logical rules (FSDP); optimizer state initialised under ``jit`` so it takes the params' shardings. With
   ``distill.teacher`` the teacher is loaded once, in the compute dtype, placed by the same rules, and never
   updated (``spb2_jax.train.step.Teacher``); with ``distill.train_only_new`` only the parameters T2H conversion
   created get updates.
3. Resume: when ``RUN_DIR/checkpoints`` holds a complete checkpoint, the train state and the data iterator are
   restored from the latest one; the run then continues bitwise as if never stopped (the step's randomness is
   ``fold_in(key(seed), step)``, the data position is in the checkpoint).
4. Steps: one jitted ``make_train_step`` per step; metrics fetched every ``log_every`` steps; a non-finite loss
   or gradient norm stops the run (``NonFiniteLoss`` naming the step; nothing is saved, so the last good
   checkpoint stays the latest); a checkpoint every ``checkpoint_every`` steps and at the last step; SIGTERM
   finishes the current step, saves and returns.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import signal
import tempfile
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import yaml

from spb2_jax.api import Model
from spb2_jax.checkpoint.auto import config_of, load_checkpoint
from spb2_jax.checkpoint.hf import hf_param_spec, save_hf
from spb2_jax.config import SpB2Config
from spb2_jax.model import SpB2ForCausalLM, abstract_params, init_params
from spb2_jax.options import resolve_options
from spb2_jax.parallel.mesh import batch_shards, make_mesh, sequence_shards, token_sharding
from spb2_jax.parallel.placement import param_shardings
from spb2_jax.parallel.rules import use_rules
from spb2_jax.train import data as data_lib
from spb2_jax.train.checkpoints import RunCheckpoints
from spb2_jax.train.config import TrainConfig, to_dict
from spb2_jax.train.flops import peak_flops, train_flops_per_token
from spb2_jax.train.metrics import RunLog, plot_loss
from spb2_jax.train.optim import learning_rate, make_optimizer
from spb2_jax.train.step import Teacher, TrainState, make_eval_step, make_train_step
from spb2_jax.t2h.convert import new_param_mask


class TrainError(ValueError):
    """A run that cannot start (bad directory, mesh, batch or model source): one message naming the cause."""


class NonFiniteLoss(RuntimeError):
    """The loss or the gradient norm of a step was NaN or Inf; the message names the step."""


@dataclasses.dataclass
class RunResult:
    """What ``train`` returns: the final state, the last step's metrics, where things were written."""

    state: TrainState
    last_metrics: dict[str, Any]
    run_dir: str
    resumed_from: int | None
    stopped_by_signal: bool = False
    samples: list[str] = dataclasses.field(default_factory=list)


def _check_run_dir(run_dir: str) -> None:
    try:
        os.makedirs(run_dir, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=run_dir)  # unique: several processes check at once
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise TrainError(f"run_dir={run_dir!r} is not writable ({e.strerror or e})") from None


def _model(config: TrainConfig) -> tuple[SpB2Config, Any, str | None]:
    """``(model config, params or None (random init), checkpoint dir for the tokenizer)``."""
    m = config.model
    if m.checkpoint is not None:
        if not os.path.isdir(m.checkpoint):
            raise TrainError(f"model.checkpoint={m.checkpoint!r}: no such directory")
        return config_of(m.checkpoint), "checkpoint", m.checkpoint
    if not os.path.isfile(m.preset):
        raise TrainError(f"model.preset={m.preset!r}: no such file")
    return SpB2Config.from_json_file(m.preset), None, None


def _mesh(config: TrainConfig):
    if not config.mesh:
        return None
    try:
        return make_mesh(config.mesh)
    except ValueError as e:
        raise TrainError(f"mesh={config.mesh!r}: {e}") from None


def _check_shapes(config: TrainConfig, mesh) -> None:
    d = config.data
    shards = batch_shards(mesh)
    per_micro = d.batch_size // d.microbatches
    if per_micro % shards:
        raise TrainError(f"data.batch_size={d.batch_size} / data.microbatches={d.microbatches} = {per_micro} rows "
                         f"per microbatch do not divide over mesh={config.mesh!r} (data x fsdp = {shards} shards)")
    if d.seq_len % sequence_shards(mesh):
        raise TrainError(f"data.seq_len={d.seq_len} does not divide over mesh={config.mesh!r} (sequence = "
                         f"{sequence_shards(mesh)} shards)")
    if d.batch_size % jax.process_count():
        raise TrainError(f"data.batch_size={d.batch_size} does not divide over {jax.process_count()} processes")


def _place_batch(batch: dict, mesh) -> dict:
    if mesh is None:
        return {k: jnp.asarray(v) for k, v in batch.items()}
    sharding = token_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}


def _initial_params(config: TrainConfig, model_config: SpB2Config, source, mesh):
    shardings = None if mesh is None else param_shardings(model_config, mesh)
    if source == "checkpoint":
        params = load_checkpoint(config.model.checkpoint, jnp.float32, progress=False,
                                 shardings=None if mesh is None else (lambda c: param_shardings(c, mesh)))[1]
    else:
        init = jax.jit(lambda k: init_params(model_config, k), out_shardings=shardings)
        params = init(jax.random.key(config.seed))
    if config.model.init_from:
        params = _load_init_from(config.model.init_from, model_config, params, mesh)
    return params


def _load_init_from(path: str, model_config: SpB2Config, params, mesh):
    if os.path.isfile(os.path.join(path, "config.json")):
        found = config_of(path)
        ours = {n: v[1] for n, v in hf_param_spec(model_config).items()}
        theirs = {n: v[1] for n, v in hf_param_spec(found).items()}
        if ours != theirs:  # the settings may differ (a T2H stage changes MoBA / window / rope), the params not
            diff = sorted(set(ours.items()) ^ set(theirs.items()))
            raise TrainError(f"--init-from {path}: its params do not fit the model being trained (first "
                             f"difference: {diff[0][0]} {list(diff[0][1])})")
        return load_checkpoint(path, jnp.float32, progress=False,
                               shardings=None if mesh is None else (lambda c: param_shardings(c, mesh)))[1]
    if os.path.isdir(os.path.join(path, "checkpoints")):
        abstract = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype, sharding=p.sharding), params)
        return RunCheckpoints(path).restore_params(abstract)
    raise TrainError(f"--init-from {path}: neither an HF checkpoint (config.json) nor a run directory "
                     f"(checkpoints/)")


def _teacher_config(config: TrainConfig, model_config: SpB2Config) -> SpB2Config | None:
    """The distillation teacher's config, checked against the student before step 0 (None: no teacher)."""
    k = config.distill
    if k.teacher is None:
        return None
    if not os.path.isdir(k.teacher):
        raise TrainError(f"distill.teacher={k.teacher!r}: no such directory")
    try:
        teacher_config = config_of(k.teacher)
    except (ValueError, FileNotFoundError) as e:
        raise TrainError(f"distill.teacher={k.teacher!r}: {e}") from None
    if teacher_config.vocab_size != model_config.vocab_size:
        raise TrainError(f"distill.teacher={k.teacher!r}: vocabulary {teacher_config.vocab_size} != the student's "
                         f"{model_config.vocab_size}")
    if k.align_weight and (teacher_config.num_hidden_layers, teacher_config.hidden_size) != (
            model_config.num_hidden_layers, model_config.hidden_size):
        raise TrainError(f"distill.align_weight={k.align_weight} compares layer by layer: the teacher has "
                         f"{teacher_config.num_hidden_layers} layers of width {teacher_config.hidden_size}, the "
                         f"student {model_config.num_hidden_layers} of width {model_config.hidden_size}")
    return teacher_config


def _teacher(config: TrainConfig, teacher_config: SpB2Config | None, mesh) -> tuple[Teacher | None, Any]:
    """The frozen distillation teacher and its params (compute dtype, placed by the rules like the student), or
    ``(None, None)`` without one."""
    if teacher_config is None:
        return None, None
    k = config.distill
    options = resolve_options(teacher_config, dtype=config.model.dtype, impl=config.model.impl, mesh=mesh)
    _, params = load_checkpoint(k.teacher, options.dtype, progress=False,
                                shardings=None if mesh is None else (lambda c: param_shardings(c, mesh)))
    teacher = Teacher(SpB2ForCausalLM(teacher_config, options), temperature=k.temperature,
                      kl_weight=k.kl_weight, ce_weight=k.ce_weight, align_weight=k.align_weight)
    return teacher, params


def train(config: TrainConfig, *, export_hf: str | None = None) -> RunResult:
    """Run (or resume) the training run ``config`` describes (module docstring)."""
    _check_run_dir(config.run_dir)
    if export_hf and os.path.exists(os.path.join(export_hf, "config.json")):
        raise TrainError(f"--export-hf {export_hf}: already holds a checkpoint (config.json); choose a new "
                         f"directory or remove it")
    mesh = _mesh(config)
    _check_shapes(config, mesh)
    model_config, source, checkpoint_dir = _model(config)
    teacher_config = _teacher_config(config, model_config)
    d = config.data
    options = resolve_options(model_config, dtype=config.model.dtype, impl=config.model.impl,
                              remat=config.model.remat, mesh=mesh)
    with open(os.path.join(config.run_dir, "config.yaml"), "w") as f:
        yaml.safe_dump(to_dict(config), f, sort_keys=False)

    pretokenised = d.source == "recall" or d.format in ("npy", "arrayrecord")
    tokenizer = None if pretokenised else data_lib.load_tokenizer(d, checkpoint_dir)
    eos = model_config.eos_token_id
    eos = eos[0] if isinstance(eos, tuple) else eos
    train_docs, held_docs = data_lib.documents(d, tokenizer, model_config.vocab_size, config.seed, eos)
    rows = d.batch_size // jax.process_count()
    iterator = iter(data_lib.batches(train_docs, d, rows, config.seed, process_index=jax.process_index(),
                                     process_count=jax.process_count()))

    trainable = new_param_mask(model_config) if config.distill.train_only_new else None
    optimizer = make_optimizer(config.optimizer, config.steps, trainable=trainable)
    schedule = learning_rate(config.optimizer, config.steps)
    ckpt = RunCheckpoints(config.run_dir, keep=config.keep_checkpoints)
    resumed_from = ckpt.latest_step()
    with use_rules(mesh) if mesh is not None else contextlib.nullcontext():
        params = _initial_params(config, model_config, source, mesh) if resumed_from is None else None
        if params is None:  # resume: only shapes / shardings are needed
            shapes = abstract_params(model_config)
            one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
            shardings = (param_shardings(model_config, mesh) if mesh is not None
                         else jax.tree.map(lambda _: one_device, shapes))
            params = jax.tree.map(lambda p, s: jax.ShapeDtypeStruct(p.shape, jnp.float32, sharding=s), shapes,
                                  shardings)
            opt_shapes = jax.eval_shape(optimizer.init, params)
            abstract = TrainState(jax.ShapeDtypeStruct((), jnp.int32), params, opt_shapes)
            state = ckpt.restore(abstract, iterator)
        else:
            state = TrainState(jnp.zeros((), jnp.int32), params, jax.jit(optimizer.init)(params))
        start = int(jax.device_get(state.step))
        teacher, teacher_params = _teacher(config, teacher_config, mesh)  # loaded once, frozen
        step_fn = jax.jit(make_train_step(model_config, options, optimizer, schedule, microbatches=d.microbatches,
                                          loss_tile=config.loss_tile, seed=config.seed, teacher=teacher))
        eval_fn = jax.jit(make_eval_step(model_config, options, loss_tile=config.loss_tile, teacher=teacher))
        if teacher is not None:
            step_fn = functools.partial(step_fn, teacher_params=teacher_params)
            eval_fn = functools.partial(eval_fn, teacher_params=teacher_params)

        log = RunLog(config.run_dir, total_steps=config.steps, start_step=start, is_primary=jax.process_index() == 0)
        if resumed_from is not None:
            log.message(f"resumed from {ckpt.directory}/{resumed_from} (step {start})")
        flops = train_flops_per_token(model_config, abstract_params(model_config), d.seq_len)  # model FLOPs
        peak = peak_flops(jax.devices()[0])
        stop = {"signal": False}
        previous = signal.signal(signal.SIGTERM, lambda *_: stop.__setitem__("signal", True))
        metrics: dict[str, Any] = {}
        try:
            if config.eval.at_start and start == 0:
                log.log({"step": 0, **_evaluate(eval_fn, state.params, held_docs, config, mesh,
                                                teacher is not None)})
            t_last, steps_since = time.perf_counter(), 0
            for step in range(start, config.steps):
                batch = _place_batch(next(iterator), mesh)
                state, out = step_fn(state, batch)
                steps_since += 1
                done = step + 1
                last = done == config.steps
                if done == 1 or done % config.log_every == 0 or last or stop["signal"]:
                    out = jax.device_get(out)
                    if not bool(out["finite"]):
                        raise NonFiniteLoss(f"step {done}: loss={float(out['loss'])} grad_norm="
                                            f"{float(out['grad_norm'])} is not finite; the run stopped without "
                                            f"saving (the last good checkpoint stays the latest)")
                    elapsed = time.perf_counter() - t_last
                    tps = steps_since * d.batch_size * d.seq_len / elapsed
                    metrics = {"step": done, "loss": float(out["loss"]), "ce_loss": float(out["ce_loss"]),
                               "aux_loss": float(out["aux_loss"]), "grad_norm": float(out["grad_norm"]),
                               "lr": float(out["lr"]), "tokens": int(out["tokens"]), "tokens_per_s": tps,
                               "step_time_s": elapsed / steps_since}
                    for key in ("kl_loss", "align_loss"):
                        if key in out:
                            metrics[key] = float(out[key])
                    if peak:
                        metrics["mfu"] = flops * tps / (peak * jax.device_count())
                    if config.eval.every and (done % config.eval.every == 0 or last):
                        metrics.update(_evaluate(eval_fn, state.params, held_docs, config, mesh,
                                                 teacher is not None))
                    log.log(metrics)
                    t_last, steps_since = time.perf_counter(), 0
                log.advance()
                if done % config.checkpoint_every == 0 or last or stop["signal"]:
                    ckpt.save(state, iterator, force=True)
                if stop["signal"]:
                    log.message(f"SIGTERM: saved step {done} and stopped")
                    break
        finally:
            signal.signal(signal.SIGTERM, previous)
            ckpt.close()
            log.close()
        samples = []
        want_samples = bool(config.sample_prompts) and tokenizer is not None and not stop["signal"]
        multi = jax.process_count() > 1
        # Several processes: every process takes part in gathering the params; process 0 then samples on its own
        # first device (no cross-process generate) and writes the export.
        host = _host_params(state.params) if export_hf or (want_samples and multi) else None
        if jax.process_index() == 0:
            plot_loss(config.run_dir)
            if want_samples:
                params, sample_mesh, sample_options = state.params, mesh, options
                if multi:
                    params, sample_mesh = host, None
                    sample_options = resolve_options(model_config, dtype=config.model.dtype, impl=config.model.impl)
                samples = sample(model_config, sample_options, params, tokenizer, config.sample_prompts,
                                 config.sample_tokens, config.sample_temperature, config.seed, sample_mesh)
                with open(os.path.join(config.run_dir, "samples.txt"), "w") as f:
                    f.write("\n\n----\n".join(samples) + "\n")
            if export_hf:
                save_hf(model_config, host, export_hf, progress=False)
                if tokenizer is not None:  # the export reads text like the run did
                    tokenizer.save(os.path.join(export_hf, "tokenizer.json"))
    return RunResult(state, metrics, config.run_dir, resumed_from, stop["signal"], samples)


def _host_params(params):
    """The params as host numpy arrays; with several processes every process must call this (an all-gather)."""
    if jax.process_count() == 1:
        return jax.device_get(params)
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(params, tiled=True)


def _evaluate(eval_fn, params, held_docs, config: TrainConfig, mesh, distilling: bool = False) -> dict:
    """Held-out ``eval_loss`` (mean CE in nats per target), ``eval_accuracy`` (fraction of targets predicted by
    the argmax) and, when distilling, ``eval_kl`` (mean KL(teacher || student) per target, temperature 1) over
    ``config.eval.batches`` packed batches of the held-out documents (the same batches every time)."""
    d = config.data
    rows = d.batch_size // jax.process_count()
    it = iter(data_lib.batches(held_docs, d, rows, config.seed, process_index=jax.process_index(),
                               process_count=jax.process_count(), shuffle=False))
    nll = count = correct = kl = 0.0
    for _ in range(config.eval.batches):
        got = jax.device_get(eval_fn(params, _place_batch(next(it), mesh)))
        nll, count, correct, kl = (nll + float(got[0]), count + float(got[1]), correct + float(got[2]),
                                   kl + float(got[3]))
    out = {"eval_loss": nll / max(count, 1.0), "eval_accuracy": correct / max(count, 1.0)}
    if distilling:
        out["eval_kl"] = kl / max(count, 1.0)
    return out


def sample(model_config, options, params, tokenizer, prompts, max_new_tokens: int, temperature: float = 0.0,
           seed: int = 0, mesh=None) -> list[str]:
    """Continuations of ``prompts`` with the trained params (``spb2_jax.api.Model.generate``; greedy at
    temperature 0), each prompt followed by its continuation."""
    model = Model(config=model_config, options=options, params=params, tokenizer=tokenizer, mesh=mesh)
    out = model.generate(list(prompts), max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
    return [p + c for p, c in zip(prompts, out)]
