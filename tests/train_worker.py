"""Sharded training on 8 forced CPU devices, run in a subprocess by ``tests/test_train.py`` (the device count must
be set before jax is imported): ``python -m tests.train_worker RUN_ROOT DOCS STEPS SPEC...`` trains the tiny
hybrid on pre-tokenised documents for STEPS steps on one device and under each mesh SPEC, and prints one JSON
object ``{spec: [loss of every step]}`` (``""`` = one device) on its last line. Arguments after ``--`` are extra
config overrides for every run."""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import json  # noqa: E402
import sys  # noqa: E402

from spb2_jax.train import load_config, train  # noqa: E402
from spb2_jax.train.metrics import read_metrics  # noqa: E402
from tests.helpers import REPO  # noqa: E402


def main(run_root: str, docs: str, steps: str, *args: str) -> None:
    specs, extra = (args[:args.index("--")], args[args.index("--") + 1:]) if "--" in args else (args, ())
    losses = {}
    for spec in ("",) + specs:
        run_dir = os.path.join(run_root, spec.replace(",", "_").replace("=", "") or "one-device")
        config = load_config(None, [f"run_dir={run_dir}", f"model.preset={REPO / 'configs' / 'tiny.json'}",
                                    f"data.source={docs}", "data.format=npy", "data.extensions=.npy",
                                    "data.seq_len=64", "data.batch_size=8", "data.eval_documents=2", f"steps={steps}",
                                    f"checkpoint_every={steps}", "log_every=1", "optimizer.lr=1e-3",
                                    "optimizer.eps=1e-3",  # see test_sharded_training_equals_one_device
                                    f"mesh={spec}", *extra])
        train(config)
        losses[spec] = [r["loss"] for r in read_metrics(run_dir)]
    print(json.dumps(losses))


if __name__ == "__main__":
    main(*sys.argv[1:])
