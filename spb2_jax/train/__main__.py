"""``python -m spb2_jax.train --config FILE.yaml [key.sub=value ...] [--init-from DIR] [--export-hf DIR]``.

Resumes automatically when ``run_dir`` already holds a checkpoint. Multi-host: run the same command on every host
with ``--coordinator HOST:PORT --num-processes N --process-id I`` (or ``--distributed`` where jax detects the
cluster itself: TPU pods, SLURM); ``jax.distributed.initialize`` runs before anything else touches jax, each
process reads its own share of the data and the mesh spans every process's devices.

A user mistake (bad config field, unwritable run directory, mesh or batch mismatch, missing file, incomplete
multi-host flags) prints one ``error:`` line and exits with status 2; a non-finite loss prints
``error: step N: ...`` and exits with status 3.
"""

from __future__ import annotations

import argparse
import sys

from spb2_jax.train.config import ConfigError, load_config


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m spb2_jax.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="training config YAML (configs/train/*.yaml)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. steps=100 optimizer.lr=3e-4")
    parser.add_argument("--init-from", help="load params only from an HF checkpoint or a run directory")
    parser.add_argument("--export-hf", help="after the last step, write an HF safetensors checkpoint (and the run's "
                        "tokenizer.json) here")
    parser.add_argument("--coordinator", metavar="HOST:PORT", help="multi-host: process 0's address (every process)")
    parser.add_argument("--num-processes", type=int, help="multi-host: how many processes")
    parser.add_argument("--process-id", type=int, help="multi-host: this process's index")
    parser.add_argument("--distributed", action="store_true",
                        help="multi-host with the cluster detected by jax (TPU pod, SLURM, ...)")
    args = parser.parse_args(argv)
    explicit = (args.coordinator, args.num_processes, args.process_id)
    if any(v is not None for v in explicit) and any(v is None for v in explicit):
        print("error: --coordinator, --num-processes and --process-id go together (give all three)", file=sys.stderr)
        return 2
    overrides = list(args.overrides) + ([f"model.init_from={args.init_from}"] if args.init_from else [])
    try:
        config = load_config(args.config, overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from spb2_jax.train.loop import NonFiniteLoss, TrainError, train  # jax starts here, after the config is valid

    if args.coordinator is not None or args.distributed:
        import jax

        from spb2_jax.parallel import initialize_distributed
        try:
            if args.distributed:
                jax.distributed.initialize()
            else:
                initialize_distributed(args.coordinator, args.num_processes, args.process_id)
        except (RuntimeError, ValueError) as e:
            print(f"error: jax.distributed.initialize failed: {e}", file=sys.stderr)
            return 2
    try:
        result = train(config, export_hf=args.export_hf)
    except (TrainError, ValueError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except NonFiniteLoss as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    last = result.last_metrics
    if last:
        print(f"done: step {last['step']} loss {last['loss']:.4f}; run directory {result.run_dir}")
    for sample in result.samples:
        print(sample)
    return 0


if __name__ == "__main__":
    sys.exit(main())
