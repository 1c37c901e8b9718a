"""Import/export of HF SpikingBrain2.0 checkpoints (``config.json`` + safetensors, single file or sharded).

Only safetensors is ever read: no pickle is unpickled. Loading streams tensor by tensor: each tensor is read
with an explicit file offset straight into its own host buffer (no memory map, so no file pages count toward
the process's resident memory), transposed/cast when needed, and handed to JAX before the next one is read.
Peak host memory is therefore the parameter bytes plus about one tensor (see BENCHMARKS.md).
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import json
import os
import shutil
import sys
import tempfile
from typing import Any, Callable, Iterable, Mapping

import jax
import ml_dtypes
import numpy as np
from flax import traverse_util
from safetensors.numpy import save_file
from tqdm.auto import tqdm

from spb2_jax.checkpoint.names import flax_path_to_hf, hf_shape
from spb2_jax.config import SpB2Config
from spb2_jax.model import abstract_params

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
CONFIG_FILE = "config.json"
TIED_HEAD = "lm_head.weight"

# safetensors dtype tags -> numpy dtypes (bfloat16 / float8 via ml_dtypes, as JAX uses them)
SAFETENSORS_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U64": np.dtype(np.uint64), "U32": np.dtype(np.uint32),
    "U16": np.dtype(np.uint16), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
_MAX_HEADER_BYTES = 100 * 2**20  # the safetensors format's own limit on the JSON header
_ALIGNMENT = 64  # bytes; what XLA's CPU client needs to adopt a host buffer without copying
_TILE = 64  # rows/cols per tile of a transposing copy (64x64 measured fastest for bf16 on a 2-core VM)


class CheckpointError(ValueError):
    """A checkpoint does not match the model (lists every offending tensor) or is malformed."""


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: file, safetensors dtype tag, HF shape, absolute byte offset and size."""

    file: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int


def hf_param_spec(config: SpB2Config) -> dict[str, tuple[tuple[str, ...], tuple[int, ...], bool]]:
    """``{hf_name: (flax_path, hf_shape, transposed)}`` for every param of ``config``.

    ``lm_head.weight`` is present only when the embeddings are untied. Derived from
    ``spb2_jax.model.abstract_params`` (cached per config, since tracing the model init is not free).
    """
    return dict(_param_spec(config))


@functools.lru_cache(maxsize=32)
def _param_spec(config: SpB2Config) -> tuple[tuple[str, tuple[tuple[str, ...], tuple[int, ...], bool]], ...]:
    flat = traverse_util.flatten_dict(abstract_params(config))
    spec = {}
    for path, leaf in flat.items():
        name, transposed = flax_path_to_hf(path)
        if name in spec:
            raise RuntimeError(f"two params map to the HF name {name!r}: {spec[name][0]} and {path}")
        spec[name] = (path, hf_shape(leaf.shape, transposed), transposed)
    return tuple(spec.items())


# ----------------------------------------------------------------------------------------------------------
# reading
# ----------------------------------------------------------------------------------------------------------
def read_safetensors_header(fname: str | os.PathLike) -> dict[str, TensorInfo]:
    """Parse the header of one safetensors file (no tensor data is read): ``{name: TensorInfo}``.

    Raises ``CheckpointError`` when the file is not a well-formed safetensors file.
    """
    fname = os.fspath(fname)
    size = os.path.getsize(fname)
    with open(fname, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise CheckpointError(f"{fname} is not a safetensors file (shorter than 8 bytes)")
        n = int.from_bytes(prefix, "little")
        if n > _MAX_HEADER_BYTES or 8 + n > size:
            raise CheckpointError(f"{fname} is not a safetensors file (header length {n} does not fit "
                                  f"the file of {size} bytes)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{fname} is not a safetensors file (bad JSON header: {e})") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{fname} is not a safetensors file (header is not a JSON object)")
    start = 8 + n
    infos = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            tag, shape, (begin, end) = entry["dtype"], tuple(int(d) for d in entry["shape"]), entry["data_offsets"]
        except (TypeError, KeyError, ValueError) as e:
            raise CheckpointError(f"{fname}: malformed header entry for {name!r}: {entry!r}") from e
        if tag not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"{fname}: tensor {name!r} has unsupported dtype {tag!r}")
        expected = int(np.prod(shape, dtype=np.int64)) * SAFETENSORS_DTYPES[tag].itemsize
        if not (0 <= begin <= end and end - begin == expected and start + end <= size):
            raise CheckpointError(f"{fname}: tensor {name!r} ({tag} {list(shape)}) has data offsets "
                                  f"[{begin}, {end}] inconsistent with its shape or the file size")
        infos[name] = TensorInfo(fname, tag, shape, start + begin, end - begin)
    return infos


def _aligned_empty(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """``np.empty`` whose data starts on a 64-byte boundary, so that ``jax.device_put`` on CPU can adopt the
    buffer without copying it (numpy's own large allocations are often only 16-byte aligned)."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(nbytes + _ALIGNMENT, np.uint8)
    start = -raw.ctypes.data % _ALIGNMENT
    return raw[start:start + nbytes].view(dtype).reshape(shape)


def _copy_transposed(src: np.ndarray, out: np.ndarray) -> None:
    """``out[...] = src.T`` (with a cast when the dtypes differ), tile by tile.

    A single strided copy of a large matrix misses the cache on every element; cache-sized tiles make the
    transpose about twice as fast. Same-dtype copies go through unsigned-int views of the same width, which
    numpy copies faster than extension dtypes such as bfloat16.
    """
    if src.ndim != 2:
        np.copyto(out, src.T, casting="unsafe")
        return
    if src.dtype == out.dtype and src.dtype.itemsize in (1, 2, 4, 8):
        as_uint = np.dtype(f"u{src.dtype.itemsize}")
        src, out = src.view(as_uint), out.view(as_uint)
    rows, cols = src.shape
    for i in range(0, rows, _TILE):
        for j in range(0, cols, _TILE):
            np.copyto(out[j:j + _TILE, i:i + _TILE], src[i:i + _TILE, j:j + _TILE].T, casting="unsafe")


def read_tensor(f: Any, info: TensorInfo) -> np.ndarray:
    """Read one tensor from the open binary file ``f`` into a new, writable host array (HF layout).

    Uses a positioned read of exactly the tensor's bytes into the array's own buffer: one copy, no mmap.
    """
    if sys.byteorder != "little":  # pragma: no cover - safetensors data is little-endian, as are JAX hosts
        raise CheckpointError("reading safetensors on a big-endian host is not supported")
    out = _aligned_empty(info.shape, SAFETENSORS_DTYPES[info.dtype])
    view = memoryview(out.reshape(-1).view(np.uint8))
    f.seek(info.offset)
    done = 0
    while done < info.nbytes:
        got = f.readinto(view[done:])
        if not got:
            raise CheckpointError(f"{info.file}: unexpected end of file while reading a tensor at byte "
                                  f"{info.offset + done}")
        done += got
    return out


def _weight_files(path: str) -> dict[str, str]:
    """``{tensor_name: file}`` of a checkpoint directory (single file or sharded index)."""
    single = os.path.join(path, SINGLE_FILE)
    index = os.path.join(path, INDEX_FILE)
    if os.path.isfile(index):
        try:
            with open(index) as f:
                weight_map = json.load(f).get("weight_map")
        except (json.JSONDecodeError, AttributeError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index: {e}") from e
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index} has no 'weight_map' dict")
        bad = sorted({f for f in weight_map.values()
                      if not isinstance(f, str) or os.path.basename(f) != f or f in ("", ".", "..")})
        if bad:
            raise CheckpointError(f"{index} names shard files outside the checkpoint directory: {bad}")
        files = {name: os.path.join(path, fname) for name, fname in weight_map.items()}
        absent = sorted({os.path.basename(f) for f in files.values() if not os.path.isfile(f)})
        if absent:
            raise CheckpointError(f"{index} names shard files that do not exist in {path}: {absent}")
        return files
    if os.path.isfile(single):
        return {name: single for name in read_safetensors_header(single)}
    bins = sorted(glob.glob(os.path.join(path, "pytorch_model*.bin")))
    if bins:
        raise CheckpointError(
            f"{path} holds only PyTorch pickle weights ({', '.join(os.path.basename(b) for b in bins)}); "
            "spb2_jax reads safetensors only and never unpickles. Convert once with transformers, e.g. "
            "`AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).save_pretrained(out, "
            "safe_serialization=True)`, then load `out`.")
    raise FileNotFoundError(f"no {SINGLE_FILE} or {INDEX_FILE} in {path!r}")


def _tensor_infos(files: Mapping[str, str]) -> dict[str, TensorInfo]:
    """Headers of every file of ``files``, restricted to the tensors each file is responsible for."""
    infos = {}
    for fname in sorted(set(files.values())):
        for name, info in read_safetensors_header(fname).items():
            if files.get(name) == fname:
                infos[name] = info
    missing_in_files = sorted(set(files) - set(infos))
    if missing_in_files:
        raise CheckpointError(f"the index lists tensors that are not in their shard files: {missing_in_files}")
    return infos


def _problems(spec: Mapping[str, tuple], shapes: Mapping[str, tuple[int, ...]], *, tied: bool,
              strict: bool) -> list[str]:
    problems = []
    for name in sorted(set(spec) - set(shapes)):
        problems.append(f"  missing:     {name} (expected shape {list(spec[name][1])}, found none)")
    if strict:
        for name in sorted(set(shapes) - set(spec)):
            if name == TIED_HEAD and tied:
                continue  # tied: the head is the embedding matrix; an explicit copy is ignored
            problems.append(f"  unexpected:  {name} (expected none, found shape {list(shapes[name])})")
    for name in sorted(set(spec) & set(shapes)):
        if tuple(shapes[name]) != spec[name][1]:
            problems.append(f"  wrong shape: {name} (expected shape {list(spec[name][1])}, "
                            f"found {list(shapes[name])})")
    return problems


def check_checkpoint(config: SpB2Config, shapes: Mapping[str, tuple[int, ...]], *, strict: bool = True) -> None:
    """Raise one ``CheckpointError`` listing every missing, unexpected (when strict) or wrongly-shaped tensor.

    ``shapes`` maps HF tensor names to their HF shapes. With tied embeddings an ``lm_head.weight`` in the file
    is tolerated (and ignored).
    """
    _raise_problems(_problems(hf_param_spec(config), shapes, tied=config.tie_word_embeddings, strict=strict))


def _raise_problems(problems: list[str]) -> None:
    if problems:
        raise CheckpointError(f"checkpoint does not match the config ({len(problems)} problems):\n"
                              + "\n".join(problems))


def _to_device(array: np.ndarray, transposed: bool, dtype: np.dtype | None, sharding: Any = None) -> jax.Array:
    """HF-layout host array -> JAX array in Flax layout and ``dtype``; at most one extra host copy (of this
    one tensor). On CPU the final aligned buffer is adopted by JAX without a copy. With ``sharding`` each
    addressable shard is copied to its device from the host array."""
    target = array.dtype if dtype is None else dtype
    if transposed:
        out = _aligned_empty(array.shape[::-1], target)
        _copy_transposed(array, out)
        array = out
    elif target != array.dtype:
        out = _aligned_empty(array.shape, target)
        np.copyto(out, array, casting="unsafe")
        array = out
    if sharding is not None:
        return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])
    return jax.device_put(array)


def load_hf(path: str | os.PathLike, dtype: Any = None, *, strict: bool = True,
            progress: bool = True, shardings: Any = None) -> tuple[SpB2Config, Any]:
    """Load an HF checkpoint directory into ``(config, params)``.

    Args:
      path: directory with ``config.json`` and ``model.safetensors`` or a sharded ``model.safetensors.index.json``.
      dtype: cast every param to this dtype (e.g. ``jnp.bfloat16``); ``None`` keeps the stored dtypes.
      strict: unexpected tensors are an error (missing and wrongly-shaped tensors always are).
      progress: show a tqdm bar over tensors.
      shardings: optional ``config -> params tree of jax.sharding.Sharding`` (e.g. the logical rules over a mesh,
        ``spb2_jax.parallel.placement.param_shardings``): each tensor is placed on its shards as it is read
        (``jax.make_array_from_callback``, so every process puts only its own shards on its devices), never the
        whole model on one device.
    Returns:
      the validated ``SpB2Config`` and the Flax param tree for ``SpB2ForCausalLM`` (on the default device, or
      placed by ``shardings``).
    Raises:
      FileNotFoundError: no such directory, no ``config.json``, or no weights at all.
      CheckpointError: listing every missing / unexpected / wrongly-shaped tensor; malformed files; or a
        directory that holds only PyTorch pickles (never unpickled).
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint directory {path!r} does not exist")
    config = SpB2Config.from_pretrained(path)
    return config, read_params(path, config, dtype=dtype, strict=strict, progress=progress, shardings=shardings)


def read_params(path: str | os.PathLike, config: SpB2Config, *, rename: Callable[[str], str] | None = None,
                dtype: Any = None, strict: bool = True, progress: bool = True, shardings: Any = None) -> Any:
    """The Flax param tree of ``config`` read from the safetensors of checkpoint directory ``path``.

    ``rename`` maps each stored tensor name to its SpB2 HF name (a checkpoint of another family, e.g. Qwen3:
    ``spb2_jax.checkpoint.qwen3``); the other arguments are ``load_hf``'s. Problems are reported with the SpB2
    names.
    """
    path = os.fspath(path)
    infos = _tensor_infos(_weight_files(path))
    if rename is not None:
        infos = {rename(n): i for n, i in infos.items()}
    spec = hf_param_spec(config)
    _raise_problems(_problems(spec, {n: i.shape for n, i in infos.items()},
                              tied=config.tie_word_embeddings, strict=strict))
    target = None if dtype is None else np.dtype(dtype)
    by_file: dict[str, list[str]] = {}
    for name in spec:
        by_file.setdefault(infos[name].file, []).append(name)
    placement = {} if shardings is None else traverse_util.flatten_dict(shardings(config))
    flat = {}
    with tqdm(total=len(spec), desc=f"loading {os.path.basename(path.rstrip('/'))}", unit="tensor",
              disable=not progress) as bar:
        for fname in sorted(by_file):
            with open(fname, "rb", buffering=0) as f:
                for name in sorted(by_file[fname], key=lambda n: infos[n].offset):
                    fpath, _, transposed = spec[name]
                    flat[fpath] = _to_device(read_tensor(f, infos[name]), transposed, target,
                                             placement.get(fpath))
                    bar.update()
    return traverse_util.unflatten_dict(flat)


# ----------------------------------------------------------------------------------------------------------
# writing
# ----------------------------------------------------------------------------------------------------------
def parse_size(size: int | str) -> int:
    """``5_000_000``, ``"5GB"``, ``"500MB"``, ``"2GiB"``, ``"64KB"`` -> bytes (decimal KB/MB/GB, binary KiB/...)."""
    if isinstance(size, (int, np.integer)) and not isinstance(size, bool):
        value = int(size)
    else:
        units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
                 "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40, "B": 1}
        s = str(size).strip().upper()
        mult = 1
        for unit, m in sorted(units.items(), key=lambda u: -len(u[0])):
            if s.endswith(unit):
                s, mult = s[: -len(unit)].strip(), m
                break
        try:
            value = int(float(s) * mult)
        except ValueError:
            raise ValueError(f"cannot parse size {size!r}; use bytes or e.g. '5GB', '500MB', '2GiB'") from None
    if value <= 0:
        raise ValueError(f"size must be positive, got {size!r}")
    return value


def plan_shards(sizes: Iterable[tuple[str, int]], max_shard_size: int | str) -> list[list[str]]:
    """Split ``(name, nbytes)`` pairs, in order, into consecutive shards of at most ``max_shard_size`` bytes
    (a single tensor larger than the limit gets a shard of its own)."""
    limit = parse_size(max_shard_size)
    shards: list[list[str]] = [[]]
    used = 0
    for name, nbytes in sizes:
        if shards[-1] and used + nbytes > limit:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += nbytes
    return shards if shards[-1] else []


def shard_filenames(n: int) -> list[str]:
    """HF file names of ``n`` shards: ``model.safetensors`` for one, ``model-0000i-of-0000n.safetensors`` else."""
    return [SINGLE_FILE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def write_index(path: str, weight_map: Mapping[str, str], total_size: int) -> str:
    """Write ``model.safetensors.index.json`` (HF layout) into ``path``; returns its file name."""
    fname = os.path.join(path, INDEX_FILE)
    with open(fname, "w") as f:
        json.dump({"metadata": {"total_size": int(total_size)}, "weight_map": dict(sorted(weight_map.items()))},
                  f, indent=2)
        f.write("\n")
    return fname


def existing_checkpoint_files(path: str) -> list[str]:
    """Names of checkpoint files (config, safetensors, index) already in ``path``."""
    found = [f for f in (CONFIG_FILE, SINGLE_FILE, INDEX_FILE) if os.path.exists(os.path.join(path, f))]
    found += [os.path.basename(f) for f in glob.glob(os.path.join(path, "model-*-of-*.safetensors"))]
    return sorted(found)


def _export_plan(config: SpB2Config, params: Any) -> list[tuple[str, Any, bool]]:
    """``[(hf_name, leaf, transposed)]`` sorted by name, after checking params against the config."""
    flat = traverse_util.flatten_dict(params)
    spec = hf_param_spec(config)
    by_path = {v[0]: k for k, v in spec.items()}
    problems = []
    for name, (fpath, shape, transposed) in sorted(spec.items()):
        flax_shape = tuple(reversed(shape)) if transposed else shape
        if fpath not in flat:
            problems.append(f"  missing:     {'/'.join(fpath)} (expected shape {list(flax_shape)})")
        elif tuple(flat[fpath].shape) != flax_shape:
            problems.append(f"  wrong shape: {'/'.join(fpath)} (expected shape {list(flax_shape)}, "
                            f"found {list(flat[fpath].shape)})")
    for fpath in sorted(set(flat) - set(by_path)):
        problems.append(f"  unexpected:  {'/'.join(fpath)} (found shape {list(flat[fpath].shape)})")
    if problems:
        raise CheckpointError(f"params do not match the config ({len(problems)} problems):\n" + "\n".join(problems))
    return [(name, flat[spec[name][0]], spec[name][2]) for name in sorted(spec)]


def _to_host(leaf: Any, transposed: bool) -> np.ndarray:
    host = np.asarray(jax.device_get(leaf))
    return np.ascontiguousarray(host.T if transposed else host)


def save_hf(config: SpB2Config, params: Any, path: str | os.PathLike, *, max_shard_size: int | str = "5GB",
            overwrite: bool = False, progress: bool = True, rename: Callable[[str], str] | None = None,
            config_json: str | None = None, extra: Iterable[tuple[str, Any]] = ()) -> list[str]:
    """Write ``config.json`` and safetensors shards that the official code (``from_pretrained``) loads.

    One ``model.safetensors`` when everything fits in ``max_shard_size``, else ``model-0000i-of-0000n.safetensors``
    plus ``model.safetensors.index.json``. Tensors keep the params' dtypes. Tied embeddings are written once (no
    ``lm_head.weight``). Refuses to replace an existing checkpoint unless ``overwrite=True`` (then the old
    checkpoint files, stale shards included, are replaced). Files are written to a temporary directory next to
    ``path`` and moved in place at the end, so a failed save leaves nothing half-written. Host memory: one shard
    at a time.

    ``rename`` (SpB2 HF name -> stored name) and ``config_json`` (the text of ``config.json``) write a checkpoint
    of another family instead (``spb2_jax.checkpoint.qwen3.save_qwen3``); ``extra``: more ``(stored name, array in
    stored layout)`` tensors written alongside (a VL checkpoint's vision tower, ``spb2_jax.checkpoint.vl``).

    Returns the list of files written.
    """
    path = os.fspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise FileExistsError(f"{path!r} exists and is not a directory")
    existing = existing_checkpoint_files(path) if os.path.isdir(path) else []
    if existing and not overwrite:
        raise FileExistsError(f"{path!r} already holds a checkpoint ({existing}); pass overwrite=True to replace it")
    plan = _export_plan(config, params)
    if rename is not None:
        plan = sorted(((rename(name), leaf, transposed) for name, leaf, transposed in plan), key=lambda t: t[0])
    plan = sorted(plan + [(name, leaf, False) for name, leaf in extra], key=lambda t: t[0])
    if len({name for name, _, _ in plan}) != len(plan):
        raise CheckpointError("two tensors would be written under one name (extra= repeats a model tensor)")
    sizes = {name: int(np.prod(leaf.shape, dtype=np.int64)) * np.dtype(leaf.dtype).itemsize
             for name, leaf, _ in plan}
    shards = plan_shards(sizes.items(), max_shard_size)
    by_name = {name: (leaf, transposed) for name, leaf, transposed in plan}
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".spb2_save_", dir=parent)
    try:
        weight_map = {}
        with tqdm(total=len(plan), desc="saving", unit="tensor", disable=not progress) as bar:
            for fname, names in zip(shard_filenames(len(shards)), shards):
                arrays = {}
                for name in names:
                    arrays[name] = _to_host(*by_name[name])
                    weight_map[name] = fname
                    bar.update()
                save_file(arrays, os.path.join(tmp, fname), metadata={"format": "pt"})
                del arrays
        if len(shards) > 1:
            write_index(tmp, weight_map, sum(sizes.values()))
        with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
            f.write(config.to_json_string() if config_json is None else config_json)
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
