"""One optimisation step: gradient accumulation over microbatches (``lax.scan``), the official loss weighted by
real-token counts, AdamW, and a finiteness guard.

Loss. For a batch of rows split into ``M`` microbatches, with ``N`` the number of real targets of the whole batch
(a target is the next token of the same segment; segment starts and padding have none):

    loss = sum_m NLL_m / N  +  aux_loss_coef * (1 / M) sum_m aux_m

``NLL_m`` is microbatch m's summed cross-entropy (``spb2_jax.loss.tiled_cross_entropy``: no ``[B, T, V]``
logits), so the CE part and its gradient are those of the whole batch whatever ``M`` (up to float32 summation
order). ``aux_m`` is the SSE load-balance loss of microbatch m: it is a product of two batch means (routing
probability x writer fraction, ``spb2_jax.ops.sse.sse_aux_loss``), not a sum over tokens, so like MaxText and HF
accumulation it is averaged over microbatches (with ``M = 1``: the official loss exactly). Each microbatch's
gradient of its share is added to a float32 accumulator; ``M`` only trades memory for time.

Compute runs in the options' dtype (bf16 over the float32 master params: flax casts each kernel at use); the
gradients, the accumulator, the optimizer state and the loss are float32. SWA dropout (``swa_dropout > 0``) draws
from ``fold_in(fold_in(key(seed), step), microbatch)``: a pure function of the step, so a resumed run draws the
same masks. A step whose loss or gradient norm is not finite leaves params and optimizer state unchanged and
reports ``finite = False`` (the loop stops there).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from spb2_jax.config import SpB2Config
from spb2_jax.loss import IGNORE_INDEX, tiled_cross_entropy
from spb2_jax.model import SpB2ForCausalLM, head_kernel
from spb2_jax.train.distill import aligned_layers, alignment_sum, tiled_kl
from spb2_jax.options import ModelOptions


class TrainState(NamedTuple):
    """What a step updates and a checkpoint holds: ``step`` (int32 scalar), float32 ``params``, ``opt_state``."""

    step: jax.Array
    params: Any
    opt_state: Any


def targets(input_ids: jax.Array, segment_ids: jax.Array, loss_mask: jax.Array | None = None) -> jax.Array:
    """Unshifted labels for ``causal_lm_loss``: the token ids, except ``IGNORE_INDEX`` at padding, at the first
    token of every segment (no earlier token of its document predicts it) and where ``loss_mask`` is 0."""
    start = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]],
                            axis=1)
    ignore = (segment_ids == 0) | start
    if loss_mask is not None:
        ignore = ignore | (loss_mask == 0)
    return jnp.where(ignore, IGNORE_INDEX, input_ids)


def loss_parts(model: SpB2ForCausalLM, params: Any, batch: dict, key: jax.Array | None, loss_tile: int):
    """``(nll_sum, target_count, aux)`` float32 of one (micro)batch ``{"input_ids", "segment_ids"[,
    "loss_mask"]}`` ``[B, T]``."""
    ids, seg = batch["input_ids"], batch["segment_ids"]
    out = model.apply({"params": params}, ids, segment_ids=seg, deterministic=key is None, output_logits=False,
                      rngs=None if key is None else {"dropout": key})
    kernel = head_kernel(params, model.config).astype(model.resolved_options.dtype)
    labels = targets(ids, seg, batch.get("loss_mask"))
    shifted = jnp.concatenate([labels[:, 1:], jnp.full_like(labels[:, :1], IGNORE_INDEX)], axis=1)
    nll, count = tiled_cross_entropy(out.last_hidden_state, kernel, shifted, tile_size=loss_tile)
    return nll.astype(jnp.float32), count.astype(jnp.float32), jnp.sum(out.aux_losses.astype(jnp.float32))


class Teacher(NamedTuple):
    """A frozen distillation teacher: its model (config + options) and what the loss takes from it
    (``spb2_jax.train.config.DistillSection``)."""

    model: SpB2ForCausalLM
    temperature: float = 1.0
    kl_weight: float = 1.0
    ce_weight: float = 0.0
    align_weight: float = 0.0


def distill_parts(model: SpB2ForCausalLM, params: Any, teacher: Teacher, teacher_params: Any, batch: dict,
                  key: jax.Array | None, loss_tile: int):
    """``(nll_sum, kl_sum, align_sum, target_count, aux)`` float32 of one (micro)batch with a teacher: the
    student's CE and KL to the teacher summed over target tokens, the mixer alignment summed over real tokens
    (``spb2_jax.train.distill``). The teacher runs deterministic and gets no gradient."""
    ids, seg = batch["input_ids"], batch["segment_ids"]
    align = teacher.align_weight > 0
    out = model.apply({"params": params}, ids, segment_ids=seg, deterministic=key is None, output_logits=False,
                      output_mixer_outputs=align, rngs=None if key is None else {"dropout": key})
    t_out = teacher.model.apply({"params": jax.lax.stop_gradient(teacher_params)}, ids, segment_ids=seg,
                                output_logits=False, output_mixer_outputs=align)
    kernel = head_kernel(params, model.config).astype(model.resolved_options.dtype)
    t_kernel = jax.lax.stop_gradient(head_kernel(teacher_params, teacher.model.config)).astype(
        teacher.model.resolved_options.dtype)
    labels = targets(ids, seg, batch.get("loss_mask"))
    shifted = jnp.concatenate([labels[:, 1:], jnp.full_like(labels[:, :1], IGNORE_INDEX)], axis=1)
    nll, count = tiled_cross_entropy(out.last_hidden_state, kernel, shifted, tile_size=loss_tile)
    kl = tiled_kl(out.last_hidden_state, kernel, jax.lax.stop_gradient(t_out.last_hidden_state), t_kernel,
                  shifted != IGNORE_INDEX, temperature=teacher.temperature, tile_size=loss_tile)
    al = jnp.float32(0)
    if align:
        al = alignment_sum(out.mixer_outputs, jax.lax.stop_gradient(t_out.mixer_outputs),
                           aligned_layers(model.config), seg > 0)
    return (nll.astype(jnp.float32), kl, al, count.astype(jnp.float32),
            jnp.sum(out.aux_losses.astype(jnp.float32)))


def _split(x: jax.Array, m: int) -> jax.Array:
    return x.reshape((m, x.shape[0] // m) + x.shape[1:])


def make_train_step(config: SpB2Config, options: ModelOptions, optimizer: optax.GradientTransformation,
                    schedule: optax.Schedule, *, microbatches: int = 1, loss_tile: int = 512, seed: int = 0,
                    teacher: Teacher | None = None) -> Callable[..., tuple[TrainState, dict]]:
    """``step(state, batch[, teacher_params]) -> (state, metrics)`` (module docstring); ``batch`` rows must be a
    multiple of ``microbatches``. Metrics: loss, ce_loss, aux_loss, grad_norm, lr, tokens (real targets), finite;
    with a ``teacher`` (``teacher_params`` then required) also kl_loss and align_loss, and the loss is
    ``kl_weight * KL + ce_weight * CE + align_weight * alignment + aux_loss_coef * aux`` (KL and CE per target
    token, alignment per real token, each over the whole batch). Not jitted (the caller jits it with its
    shardings)."""
    model = SpB2ForCausalLM(config, options)
    coef = float(config.aux_loss_coef)
    dropout = config.swa_dropout > 0
    M = microbatches
    w_ce = 1.0 if teacher is None else teacher.ce_weight

    def step(state: TrainState, batch: dict, teacher_params: Any = None):
        if batch["input_ids"].shape[0] % M:
            raise ValueError(f"batch of {batch['input_ids'].shape[0]} rows is not a multiple of {M} microbatches")
        if (teacher is None) != (teacher_params is None):
            raise ValueError("teacher_params are needed exactly when the step was made with a teacher")
        labels = targets(batch["input_ids"], batch["segment_ids"], batch.get("loss_mask"))
        n_total = jnp.maximum(jnp.sum(labels[:, 1:] != IGNORE_INDEX), 1).astype(jnp.float32)
        n_real = jnp.maximum(jnp.sum(batch["segment_ids"] > 0), 1).astype(jnp.float32)
        key = jax.random.fold_in(jax.random.key(seed), state.step)

        def micro(carry, xs):
            grads, sums = carry
            index, mb = xs
            mkey = jax.random.fold_in(key, index) if dropout else None

            def objective(params):
                if teacher is None:
                    nll, count, aux = loss_parts(model, params, mb, mkey, loss_tile)
                    kl = al = jnp.float32(0)
                else:
                    nll, kl, al, count, aux = distill_parts(model, params, teacher, teacher_params, mb, mkey,
                                                            loss_tile)
                total = w_ce * nll / n_total + coef * aux / M
                if teacher is not None:
                    total = total + teacher.kl_weight * kl / n_total + teacher.align_weight * al / n_real
                return total, jnp.stack([nll, count, aux, kl, al])

            (_, parts), g = jax.value_and_grad(objective, has_aux=True)(state.params)
            grads = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), grads, g)
            return (grads, sums + parts), None

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
        init = (zeros, jnp.zeros((5,), jnp.float32))
        mbs = {k: _split(v, M) for k, v in batch.items()}
        (grads, sums), _ = jax.lax.scan(micro, init, (jnp.arange(M), mbs))
        nll, count, aux, kl, al = sums
        ce, aux = nll / n_total, aux / M
        loss = w_ce * ce + coef * aux
        metrics = {"ce_loss": ce, "aux_loss": aux}
        if teacher is not None:
            metrics["kl_loss"], metrics["align_loss"] = kl / n_total, al / n_real
            loss = loss + teacher.kl_weight * metrics["kl_loss"] + teacher.align_weight * metrics["align_loss"]
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        keep = lambda new, old: jnp.where(finite, new, old)  # noqa: E731
        params = jax.tree.map(keep, params, state.params)
        opt_state = jax.tree.map(keep, opt_state, state.opt_state)
        metrics.update({"loss": loss, "grad_norm": grad_norm, "lr": jnp.asarray(schedule(state.step), jnp.float32),
                        "tokens": count, "finite": finite})
        return TrainState(state.step + 1, params, opt_state), metrics

    return step


def make_eval_step(config: SpB2Config, options: ModelOptions, *, loss_tile: int = 512,
                   teacher: Teacher | None = None):
    """``eval(params, batch[, teacher_params]) -> (nll_sum, target_count, correct, kl_sum)``: the held-out CE of
    a batch (no dropout), how many targets are the argmax of their logits (for ``recall`` data: the recall
    accuracy) and, with a ``teacher``, the summed KL(teacher || student) over the targets at temperature 1 (the
    plain KL, whatever the training temperature; 0 without a teacher; tiled, so the teacher's ``[B, T, V]`` logits
    never exist). Materialises the student's ``[B, T, V]`` logits (eval batches are small)."""
    model = SpB2ForCausalLM(config, options)

    def evaluate(params, batch, teacher_params=None):
        ids, seg = batch["input_ids"], batch["segment_ids"]
        out = model.apply({"params": params}, ids, segment_ids=seg)
        logits = out.logits.astype(jnp.float32)
        labels = targets(ids, seg, batch.get("loss_mask"))
        nxt = jnp.concatenate([labels[:, 1:], jnp.full_like(labels[:, :1], IGNORE_INDEX)], axis=1)
        valid = nxt != IGNORE_INDEX
        logp = jax.nn.log_softmax(logits, axis=-1)
        nll = -jnp.take_along_axis(logp, jnp.where(valid, nxt, 0)[..., None], axis=-1)[..., 0]
        correct = (jnp.argmax(logits, axis=-1) == nxt) & valid
        kl = jnp.float32(0)
        if teacher is not None:  # tiled: the teacher's [B, T, V] logits never exist
            t_out = teacher.model.apply({"params": teacher_params}, ids, segment_ids=seg, output_logits=False)
            t_kernel = head_kernel(teacher_params, teacher.model.config).astype(teacher.model.resolved_options.dtype)
            kernel = head_kernel(params, config).astype(model.resolved_options.dtype)
            kl = tiled_kl(out.last_hidden_state, kernel, t_out.last_hidden_state, t_kernel, valid, temperature=1.0,
                          tile_size=loss_tile)
        return jnp.sum(jnp.where(valid, nll, 0.0)), jnp.sum(valid).astype(jnp.float32), jnp.sum(correct), kl

    return evaluate
