"""Import/export of HF SpikingBrain2.0 checkpoints (``config.json`` + safetensors, single file or sharded).

Only safetensors is ever read: no pickle is unpickled. Loading streams tensor by tensor (memory-mapped file,
one host copy of one tensor at a time) so that peak host memory stays close to the parameter bytes.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import tempfile
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from safetensors import safe_open
from safetensors.numpy import save_file
from tqdm.auto import tqdm

from spb2_jax.checkpoint.names import flax_path_to_hf, hf_shape
from spb2_jax.config import SpB2Config
from spb2_jax.model import abstract_params

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
CONFIG_FILE = "config.json"
TIED_HEAD = "lm_head.weight"


class CheckpointError(ValueError):
    """A checkpoint does not match the model: lists every offending tensor."""


def hf_param_spec(config: SpB2Config) -> dict[str, tuple[tuple[str, ...], tuple[int, ...], bool]]:
    """``{hf_name: (flax_path, hf_shape, transposed)}`` for every param of ``config``."""
    flat = traverse_util.flatten_dict(abstract_params(config))
    spec = {}
    for path, leaf in flat.items():
        name, transposed = flax_path_to_hf(path)
        spec[name] = (path, hf_shape(leaf.shape, transposed), transposed)
    return spec


def _weight_files(path: str) -> dict[str, str]:
    """``{tensor_name: file}`` of a checkpoint directory (single file or sharded index)."""
    single = os.path.join(path, SINGLE_FILE)
    index = os.path.join(path, INDEX_FILE)
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index} has no 'weight_map' dict")
        files = {name: os.path.join(path, fname) for name, fname in weight_map.items()}
        absent = sorted({f for f in files.values() if not os.path.isfile(f)})
        if absent:
            raise CheckpointError(f"{index} names shard files that do not exist: {absent}")
        return files
    if os.path.isfile(single):
        with safe_open(single, "numpy") as f:
            return {name: single for name in f.keys()}
    bins = sorted(glob.glob(os.path.join(path, "pytorch_model*.bin")))
    if bins:
        raise CheckpointError(
            f"{path} holds only PyTorch pickle weights ({', '.join(os.path.basename(b) for b in bins)}); "
            "spb2_jax reads safetensors only and never unpickles. Convert once with transformers, e.g. "
            "`AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).save_pretrained(out, "
            "safe_serialization=True)`, then load `out`.")
    raise FileNotFoundError(f"no {SINGLE_FILE} or {INDEX_FILE} in {path!r}")


def _tensor_shapes(files: dict[str, str]) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for fname in sorted(set(files.values())):
        with safe_open(fname, "numpy") as f:
            for name in f.keys():
                if files.get(name) == fname:
                    shapes[name] = tuple(f.get_slice(name).get_shape())
    missing_in_files = sorted(set(files) - set(shapes))
    if missing_in_files:
        raise CheckpointError(f"the index lists tensors that are not in their shard files: {missing_in_files}")
    return shapes


def check_checkpoint(config: SpB2Config, shapes: dict[str, tuple[int, ...]], *, strict: bool = True) -> None:
    """Raise one ``CheckpointError`` listing every missing, unexpected (when strict) or wrongly-shaped tensor."""
    spec = hf_param_spec(config)
    problems = []
    for name in sorted(set(spec) - set(shapes)):
        problems.append(f"  missing:    {name} (expected shape {list(spec[name][1])})")
    if strict:
        for name in sorted(set(shapes) - set(spec)):
            if name == TIED_HEAD and config.tie_word_embeddings:
                continue  # tied: the head is the embedding matrix; an explicit copy is ignored
            problems.append(f"  unexpected: {name} (shape {list(shapes[name])})")
    for name in sorted(set(spec) & set(shapes)):
        if tuple(shapes[name]) != spec[name][1]:
            problems.append(f"  wrong shape: {name}: expected {list(spec[name][1])}, found {list(shapes[name])}")
    if problems:
        raise CheckpointError(f"checkpoint does not match the config ({len(problems)} problems):\n"
                              + "\n".join(problems))


def load_hf(path: str | os.PathLike, dtype: Any = None, *, strict: bool = True,
            progress: bool = True) -> tuple[SpB2Config, Any]:
    """Load an HF checkpoint directory into ``(config, params)``.

    Args:
      path: directory with ``config.json`` and ``model.safetensors`` or a sharded ``model.safetensors.index.json``.
      dtype: cast every param to this dtype (e.g. ``jnp.bfloat16``); ``None`` keeps the stored dtypes.
      strict: unexpected tensors are an error (missing and wrongly-shaped tensors always are).
      progress: show a tqdm bar over tensors.
    Returns:
      the validated ``SpB2Config`` and the Flax param tree for ``SpB2ForCausalLM``.
    Raises:
      CheckpointError: listing every missing / unexpected / wrongly-shaped tensor, or for pickle-only dirs.
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint directory {path!r} does not exist")
    config = SpB2Config.from_pretrained(path)
    files = _weight_files(path)
    check_checkpoint(config, _tensor_shapes(files), strict=strict)
    spec = hf_param_spec(config)
    flat = {}
    by_file: dict[str, list[str]] = {}
    for name in spec:
        by_file.setdefault(files[name], []).append(name)
    bar = tqdm(total=len(spec), desc=f"loading {os.path.basename(path.rstrip('/'))}", unit="tensor",
               disable=not progress)
    for fname in sorted(by_file):
        with safe_open(fname, "numpy") as f:
            for name in sorted(by_file[fname]):
                fpath, _, transposed = spec[name]
                array = f.get_tensor(name)
                if transposed:
                    array = array.T
                if dtype is not None:
                    array = array.astype(dtype)
                flat[fpath] = jax.device_put(np.ascontiguousarray(array))
                del array
                bar.update()
    bar.close()
    return config, traverse_util.unflatten_dict(flat)


def _iter_hf_tensors(config: SpB2Config, params: Any) -> Iterator[tuple[str, Any]]:
    flat = traverse_util.flatten_dict(params)
    spec = hf_param_spec(config)
    by_path = {v[0]: (k, v[2]) for k, v in spec.items()}
    missing = sorted(k for k in spec if spec[k][0] not in flat)
    extra = sorted("/".join(p) for p in flat if p not in by_path)
    if missing or extra:
        raise CheckpointError(f"params do not match the config: missing {missing}, unexpected {extra}")
    for path in sorted(flat, key=lambda p: by_path[p][0]):
        name, transposed = by_path[path]
        leaf = flat[path]
        yield name, (leaf.T if transposed else leaf)


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    s = size.strip().upper()
    for unit, mult in sorted(units.items(), key=lambda u: -len(u[0])):
        if s.endswith(unit):
            return int(float(s[: -len(unit)]) * mult)
    return int(s)


def save_hf(config: SpB2Config, params: Any, path: str | os.PathLike, *, max_shard_size: int | str = "5GB",
            overwrite: bool = False, progress: bool = True) -> list[str]:
    """Write ``config.json`` and safetensors shards that the official code (``from_pretrained``) loads.

    One ``model.safetensors`` when everything fits in ``max_shard_size``, else ``model-0000i-of-0000n.safetensors``
    plus ``model.safetensors.index.json``. Tied embeddings are written once (no ``lm_head.weight``). Refuses to
    replace an existing checkpoint unless ``overwrite=True``. Files are written to a temporary directory next to
    ``path`` and moved in place at the end, so a failed save leaves nothing half-written.

    Returns the list of files written.
    """
    path = os.fspath(path)
    existing = [f for f in (CONFIG_FILE, SINGLE_FILE, INDEX_FILE) if os.path.exists(os.path.join(path, f))]
    existing += [os.path.basename(f) for f in glob.glob(os.path.join(path, "model-*-of-*.safetensors"))]
    if existing and not overwrite:
        raise FileExistsError(f"{path!r} already holds a checkpoint ({sorted(existing)}); "
                              "pass overwrite=True to replace it")
    limit = _parse_size(max_shard_size)
    shards: list[list[str]] = [[]]
    sizes = [0]
    tensors = list(_iter_hf_tensors(config, params))
    for name, leaf in tensors:
        nbytes = int(np.prod(leaf.shape)) * jnp.dtype(leaf.dtype).itemsize
        if shards[-1] and sizes[-1] + nbytes > limit:
            shards.append([])
            sizes.append(0)
        shards[-1].append(name)
        sizes[-1] += nbytes
    by_name = dict(tensors)
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".spb2_save_", dir=os.path.dirname(os.path.abspath(path)))
    try:
        n = len(shards)
        fnames = [SINGLE_FILE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        weight_map = {}
        bar = tqdm(total=len(tensors), desc="saving", unit="tensor", disable=not progress)
        for fname, names in zip(fnames, shards):
            arrays = {}
            for name in names:
                arrays[name] = np.ascontiguousarray(np.asarray(jax.device_get(by_name[name])))
                weight_map[name] = fname
                bar.update()
            save_file(arrays, os.path.join(tmp, fname), metadata={"format": "pt"})
            del arrays
        bar.close()
        if n > 1:
            with open(os.path.join(tmp, INDEX_FILE), "w") as f:
                json.dump({"metadata": {"total_size": sum(sizes)}, "weight_map": dict(sorted(weight_map.items()))},
                          f, indent=2)
        with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
            f.write(config.to_json_string())
        os.makedirs(path, exist_ok=True)
        for stale in existing:  # only reached with overwrite=True
            os.remove(os.path.join(path, stale))
        written = []
        for fname in sorted(os.listdir(tmp)):
            shutil.move(os.path.join(tmp, fname), os.path.join(path, fname))
            written.append(os.path.join(path, fname))
        return written
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
