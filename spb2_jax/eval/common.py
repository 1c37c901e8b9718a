"""What every evaluation shares: the user-mistake error, loading the model onto a mesh, and ``results.json``.

Every subcommand writes ``results.json`` next to its plots: ``{"command", "config", "commit", "device", "mesh",
"created", ...numbers}``, so two runs (two commits, two machines, two meshes) can be compared field by field.
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
from typing import Any

import jax

from spb2_jax.config import SpB2Config


class EvalError(ValueError):
    """A user mistake (bad path, a context longer than the text, a mesh that does not fit): the CLI prints it as
    one ``error:`` line."""


def mesh_sizes(spec: str | None) -> dict[str, int]:
    """``"sequence=4"`` -> ``{"data": 1, "fsdp": 1, "tensor": 1, "sequence": 4}`` ({} for None / ""); an
    ``EvalError`` naming the spec when it is malformed."""
    if not spec:
        return {}
    from spb2_jax.parallel.mesh import parse_mesh_spec

    try:
        return parse_mesh_spec(spec)
    except ValueError as e:
        raise EvalError(f"--mesh {spec!r}: {e}") from None


def parse_mesh(spec: str | None):
    """``"sequence=4"`` -> a mesh over the first devices (``spb2_jax.parallel.make_mesh``); None / "" -> None.
    Raises ``EvalError`` naming the spec when it is malformed or needs more devices than there are."""
    if not spec:
        return None
    from spb2_jax.parallel.mesh import make_mesh

    sizes = mesh_sizes(spec)
    need = 1
    for n in sizes.values():
        need *= n
    if need > jax.device_count():
        raise EvalError(f"--mesh {spec!r} needs {need} devices, this process has {jax.device_count()} "
                        f"({jax.default_backend()}); on CPU set XLA_FLAGS=--xla_force_host_platform_device_count="
                        f"{need} before starting")
    return make_mesh(spec, devices=jax.devices()[:need])


def load_model(checkpoint: str | None, mesh=None, progress: bool = True):
    """``spb2_jax.load_pretrained`` of an HF checkpoint directory (None: the embedded tiny model) placed on
    ``mesh``; a training run directory gets a message saying how to export it."""
    from spb2_jax.api import load_pretrained

    if checkpoint is not None:
        if not os.path.isdir(checkpoint):
            raise EvalError(f"--checkpoint {checkpoint!r}: no such directory")
        if not os.path.isfile(os.path.join(checkpoint, "config.json")):
            hint = (" (a training run directory: export it with python -m spb2_jax.train --config ... --export-hf DIR)"
                    if os.path.isdir(os.path.join(checkpoint, "checkpoints")) else "")
            raise EvalError(f"--checkpoint {checkpoint!r} has no config.json: not an HF checkpoint{hint}")
    return load_pretrained(checkpoint, mesh=mesh, progress=progress)


def git_commit() -> str:
    """The commit of the source tree this package runs from (``"unknown"`` outside a git checkout)."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if out.returncode != 0:
        return "unknown"
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here, capture_output=True,
                           text=True, timeout=10).stdout.strip()
    return out.stdout.strip() + ("+dirty" if dirty else "")


def device_info() -> dict[str, Any]:
    """Backend, device kind and count of this process."""
    d = jax.devices()[0]
    return {"backend": jax.default_backend(), "kind": d.device_kind, "count": jax.device_count(),
            "processes": jax.process_count()}


def mesh_info(mesh) -> dict[str, int] | None:
    """``{axis: size}`` of ``mesh`` (None: one device)."""
    return None if mesh is None else {str(k): int(v) for k, v in mesh.shape.items()}


def config_summary(config: SpB2Config) -> dict[str, Any]:
    """The fields of a model config that decide the numbers (its layer kinds and sizes)."""
    return {"layer_kinds": list(config.layer_kinds), "hidden_size": config.hidden_size,
            "num_hidden_layers": config.num_hidden_layers, "vocab_size": config.vocab_size,
            "window_size": config.attn.window_size, "moba_chunk_size": config.attn.moba_chunk_size,
            "moba_topk": config.attn.moba_topk, "max_position_embeddings": config.max_position_embeddings}


def write_results(out_dir: str, command: str, args: dict[str, Any], numbers: dict[str, Any], *, mesh=None,
                  model_config: SpB2Config | None = None) -> str:
    """Write ``out_dir/results.json``: the command and its arguments, the model config summary, the commit, the
    device, the mesh, the time, and ``numbers`` at the top level. Returns the path."""
    os.makedirs(out_dir, exist_ok=True)
    doc = {"command": command, "args": args,
           "config": None if model_config is None else config_summary(model_config),
           "commit": git_commit(), "device": device_info(), "mesh": mesh_info(mesh),
           "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    clash = sorted(set(doc) & set(numbers))
    if clash:
        raise ValueError(f"result keys {clash} clash with the metadata keys")
    doc.update(numbers)
    path = os.path.join(out_dir, "results.json")
    with open(path, "w") as f:
        json.dump(doc, f, indent=1, default=float)
    return path
