"""Run checkpoints with orbax ``CheckpointManager``: the train state (step, params, optimizer state) and the data
iterator's state (grain's per-process checkpoint handler), saved together under ``RUN_DIR/checkpoints/STEP``.

Saves are asynchronous (the step loop goes on while the arrays are written) and atomic: orbax writes into a
temporary directory and renames it when the save is complete, so a save interrupted by a crash or SIGKILL never
becomes ``latest_step()``; the previous checkpoint stays the latest. ``keep`` most recent checkpoints are kept.
RNG needs no state of its own: every random draw of the loop is ``fold_in(key(seed), step)``.
"""

from __future__ import annotations

import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from spb2_jax.train.step import TrainState


class RunCheckpoints:
    """The checkpoints of one run directory (module docstring)."""

    def __init__(self, run_dir: str | os.PathLike, *, keep: int = 3):
        self.directory = os.path.abspath(os.path.join(run_dir, "checkpoints"))
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True, create=True,
                                               save_interval_steps=1)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data"))

    def latest_step(self) -> int | None:
        """The step of the newest complete checkpoint, or None."""
        return self.manager.latest_step()

    def save(self, state: TrainState, data_iterator: Any, *, force: bool = False) -> None:
        """Start an asynchronous save of ``state`` and the data iterator at ``state.step``."""
        step = int(jax.device_get(state.step))
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state._asdict()),
                                                        data=grain.checkpoint.CheckpointSave(data_iterator)),
                          force=force)

    def restore(self, abstract_state: TrainState, data_iterator: Any, step: int | None = None) -> TrainState:
        """The train state at ``step`` (default: latest) laid out like ``abstract_state`` (shapes, dtypes and
        shardings); ``data_iterator`` is set to its saved position in place."""
        step = self.latest_step() if step is None else step
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state._asdict()),
            data=grain.checkpoint.CheckpointRestore(data_iterator)))
        return TrainState(**restored["state"])

    def restore_params(self, abstract_params: Any, step: int | None = None) -> Any:
        """Only the params of a checkpoint (``--init-from RUN_DIR``)."""
        step = self.latest_step() if step is None else step
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.PyTreeRestore(partial_restore=True, item={"params": abstract_params})))
        return restored["state"]["params"]

    def wait(self) -> None:
        """Block until every started save is complete (errors of an async save surface here)."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
