"""Convert a Qwen3 checkpoint into a SpikingBrain2.0 hybrid: ``python -m spb2_jax.t2h --qwen3 DIR --config
PRESET_OR_JSON --out DIR``.

``--config`` is a hybrid ``config.json`` (a path, or a preset name from the repository's ``configs/``, e.g.
``spb2-5b-cpt``) whose width, depth, heads and vocabulary equal the teacher's. Writes an HF checkpoint of the
hybrid to ``--out`` (the teacher's tokenizer files copied along), and the conversion table (copied / repeated /
new tensors and the config changes) to stdout, ``--out/t2h_conversion.txt`` and ``--out/t2h_conversion.json``.
A user mistake prints one ``error:`` line and exits 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
from pathlib import Path

from spb2_jax.checkpoint.hf import CheckpointError, existing_checkpoint_files, save_hf
from spb2_jax.checkpoint.qwen3 import load_qwen3, qwen3_config
from spb2_jax.config import SpB2Config
from spb2_jax.t2h.convert import check_compatible, config_changes, convert, format_table

PRESETS = Path(__file__).resolve().parents[2] / "configs"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "generation_config.json")


def resolve_config(name: str) -> SpB2Config:
    """A ``config.json`` path, or the name of a preset in the repository's ``configs/`` (``.json`` optional)."""
    candidates = [Path(name), PRESETS / name, PRESETS / f"{name}.json"]
    for c in candidates:
        if c.is_file():
            return SpB2Config.from_json_file(c)
    known = sorted(p.stem for p in PRESETS.glob("*.json")) if PRESETS.is_dir() else []
    raise FileNotFoundError(f"--config {name!r}: no such file and no such preset (presets: {known})")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m spb2_jax.t2h", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--qwen3", required=True, help="Qwen3 HF checkpoint directory (config.json + safetensors)")
    p.add_argument("--config", required=True, help="hybrid config.json path or preset name")
    p.add_argument("--out", required=True, help="output directory for the hybrid HF checkpoint")
    p.add_argument("--seed", type=int, default=0, help="seed of the new parameters' initialisation")
    p.add_argument("--overwrite", action="store_true", help="replace a checkpoint already in --out")
    return p


def run(qwen3: str, config: str, out: str, *, seed: int = 0, overwrite: bool = False,
        progress: bool = True) -> str:
    """Convert and write; returns the conversion table text (also written to ``out``)."""
    student = resolve_config(config)
    if os.path.isdir(out) and existing_checkpoint_files(out) and not overwrite:
        raise FileExistsError(f"--out {out!r} already holds a checkpoint ({existing_checkpoint_files(out)}); "
                              "pass --overwrite to replace it")
    config_path = os.path.join(qwen3, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"--qwen3 {qwen3!r}: no config.json")
    with open(config_path) as f:
        check_compatible(qwen3_config(json.load(f)), student)  # before reading any weights
    teacher, teacher_params = load_qwen3(qwen3, progress=progress)
    params, rows = convert(teacher, teacher_params, student, seed=seed)
    changes = config_changes(teacher, student)
    table = format_table(rows, changes)
    save_hf(student, params, out, overwrite=overwrite, progress=progress)
    for fname in TOKENIZER_FILES:
        if os.path.isfile(os.path.join(qwen3, fname)):
            shutil.copyfile(os.path.join(qwen3, fname), os.path.join(out, fname))
    with open(os.path.join(out, "t2h_conversion.txt"), "w") as f:
        f.write(table)
    with open(os.path.join(out, "t2h_conversion.json"), "w") as f:
        json.dump({"teacher": os.path.abspath(qwen3), "seed": seed,
                   "tensors": [dataclasses.asdict(r) for r in rows],
                   "config_changes": [{"field": k, "teacher": a, "student": b} for k, a, b in changes]}, f, indent=1)
    return table


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        table = run(args.qwen3, args.config, args.out, seed=args.seed, overwrite=args.overwrite)
    except (ValueError, FileNotFoundError, FileExistsError, CheckpointError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    sys.stdout.write(table)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
