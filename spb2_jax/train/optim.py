"""The optimizer: optax AdamW after global-norm clipping, a warmup + cosine / linear / constant learning rate, and
a weight-decay mask that spares norms, biases, ``A_log`` and ``dt_bias``."""

from __future__ import annotations

from typing import Any

import jax
import optax

from spb2_jax.train.config import OptimizerSection

NO_DECAY_NAMES = ("A_log", "dt_bias", "bias")  # parameter leaf names never decayed (plus every norm's scale)


def learning_rate(opt: OptimizerSection, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 over ``warmup_steps`` to ``lr``, then cosine or linear decay to ``lr * min_lr_ratio``
    at ``total_steps`` (or constant ``lr``)."""
    warmup = min(opt.warmup_steps, total_steps)
    rest = max(total_steps - warmup, 1)
    final = opt.lr * opt.min_lr_ratio
    if opt.schedule == "cosine":
        decay = optax.cosine_decay_schedule(opt.lr, rest, alpha=opt.min_lr_ratio)
    elif opt.schedule == "linear":
        decay = optax.linear_schedule(opt.lr, final, rest)
    else:
        decay = optax.constant_schedule(opt.lr)
    if warmup == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, opt.lr, warmup), decay], [warmup])


def decays(path: tuple, leaf: Any) -> bool:
    """Whether the parameter at ``path`` (a ``tree_util`` key path) gets weight decay: not norms (any path entry
    with "norm" in its name), biases, ``A_log`` or ``dt_bias``."""
    names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
    return not (any("norm" in n for n in names) or names[-1] in NO_DECAY_NAMES)


def decay_mask(params: Any) -> Any:
    """Boolean tree: True where ``decays``."""
    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(opt: OptimizerSection, total_steps: int, trainable: Any = None) -> optax.GradientTransformation:
    """``clip_by_global_norm(clip_norm)`` then AdamW (``learning_rate``, the ``decay_mask``); optimizer state in
    the params' dtype (float32 master params). ``trainable``: a boolean tree over the params; the others get no
    update at all (and no optimizer state; they do not count toward the clipped norm)."""
    inner = optax.chain(
        optax.clip_by_global_norm(opt.clip_norm),
        optax.adamw(learning_rate(opt, total_steps), b1=opt.b1, b2=opt.b2, eps=opt.eps,
                    weight_decay=opt.weight_decay, mask=decay_mask),
    )
    if trainable is None:
        return inner
    labels = jax.tree.map(lambda t: "train" if t else "frozen", trainable)
    return optax.multi_transform({"train": inner, "frozen": optax.set_to_zero()}, labels)
