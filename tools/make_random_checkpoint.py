#!/usr/bin/env python
"""Write an HF-format SpikingBrain2.0 checkpoint with random weights of a config's shape, streaming.

Tensors are generated one at a time (in chunks) and written shard by shard with safetensors, so host memory
stays at about one shard (``--max-shard-size``) however large the model is. The output directory gets
``config.json``, the shard files and, when there is more than one shard, ``model.safetensors.index.json`` --
the layout ``spb2_jax.checkpoint.load_hf`` and the official ``from_pretrained`` read.

The weights are random, not trained: linear / embedding weights ~ N(0, initializer_range), norm weights
~ 1 + N(0, 0.02), biases ~ N(0, 0.02), ``A_log = log(U(1, 16))`` and ``dt_bias = softplus^-1(dt)`` with
log-uniform ``dt`` in [1e-3, 0.1] (the official GDN init). Each tensor is seeded from ``(seed, name)``, so the
values do not depend on the shard size.

Example (the real 5B shape, ~10 GB of bfloat16)::

    python tools/make_random_checkpoint.py --config spb2-5b-cpt --out /work/tmp_ckpt/spb2-5b-random
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import zlib

import numpy as np
from safetensors.numpy import save_file
from tqdm.auto import tqdm

from spb2_jax.checkpoint import hf_param_spec, plan_shards, shard_filenames, write_index
from spb2_jax.checkpoint.hf import CONFIG_FILE
from spb2_jax.config import SpB2Config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_CHUNK = 1 << 24  # elements generated per step (64 MiB of float32 scratch)
DTYPES = {"bfloat16": "bfloat16", "bf16": "bfloat16", "float32": "float32", "fp32": "float32",
          "float16": "float16", "fp16": "float16"}


def resolve_config(spec: str) -> SpB2Config:
    """A config from a ``config.json`` path, a checkpoint directory holding one, or a preset name in ``configs/``
    (``spb2-5b-cpt`` -> ``configs/spb2-5b-cpt.json``)."""
    candidates = [spec, os.path.join(spec, CONFIG_FILE), os.path.join(REPO, "configs", spec),
                  os.path.join(REPO, "configs", spec + ".json")]
    for path in candidates:
        if os.path.isfile(path):
            return SpB2Config.from_json_file(path)
    presets = sorted(f[:-5] for f in os.listdir(os.path.join(REPO, "configs")) if f.endswith(".json")) \
        if os.path.isdir(os.path.join(REPO, "configs")) else []
    raise FileNotFoundError(f"config {spec!r} is neither a config.json path, a directory holding one, nor a preset "
                            f"in {os.path.join(REPO, 'configs')} (presets: {presets})")


def _numpy_dtype(name: str) -> np.dtype:
    import ml_dtypes  # noqa: PLC0415 - only needed here

    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


def random_tensor(name: str, shape: tuple[int, ...], dtype: np.dtype, seed: int, std: float) -> np.ndarray:
    """A random tensor for the HF param ``name`` (see the module docstring), generated in bounded chunks."""
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    out = np.empty(shape, dtype)
    flat = out.reshape(-1)
    leaf = name.rsplit(".", 1)[-1]
    for start in range(0, flat.size, _CHUNK):
        n = min(_CHUNK, flat.size - start)
        if leaf == "A_log":
            chunk = np.log(rng.uniform(1.0, 16.0, n))
        elif leaf == "dt_bias":
            dt = np.exp(rng.uniform(np.log(1e-3), np.log(0.1), n))
            chunk = dt + np.log(-np.expm1(-dt))  # inverse softplus
        elif leaf == "weight" and len(shape) == 1:  # RMSNorm scales
            chunk = 1.0 + 0.02 * rng.standard_normal(n, dtype=np.float32)
        elif leaf == "bias":
            chunk = 0.02 * rng.standard_normal(n, dtype=np.float32)
        else:
            chunk = rng.standard_normal(n, dtype=np.float32)
            chunk *= np.float32(std)
        flat[start:start + n] = chunk.astype(dtype)
    return out


def make_random_checkpoint(config: SpB2Config, out: str, *, dtype: str = "bfloat16", seed: int = 0,
                           max_shard_size: str | int = "5GB", progress: bool = True) -> list[str]:
    """Write a random checkpoint of ``config``'s shape into the new or empty directory ``out``.

    Returns the files written. Raises ``FileExistsError`` if ``out`` is a non-empty directory or a file.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
    dtype = DTYPES[dtype]
    np_dtype = _numpy_dtype(dtype)
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise FileExistsError(f"{out!r} exists and is not an empty directory; refusing to overwrite it")
    os.makedirs(out, exist_ok=True)
    config = config.replace(dtype=dtype)
    spec = hf_param_spec(config)
    names = sorted(spec)
    sizes = [(name, int(np.prod(spec[name][1], dtype=np.int64)) * np_dtype.itemsize) for name in names]
    total = sum(s for _, s in sizes)
    shards = plan_shards(sizes, max_shard_size)
    fnames = shard_filenames(len(shards))
    weight_map, written = {}, []
    with tqdm(total=total, desc="writing random checkpoint", unit="B", unit_scale=True,
              disable=not progress) as bar:
        for fname, shard in zip(fnames, shards):
            arrays = {}
            for name in shard:
                arrays[name] = random_tensor(name, spec[name][1], np_dtype, seed, config.initializer_range)
                weight_map[name] = fname
                bar.update(arrays[name].nbytes)
            save_file(arrays, os.path.join(out, fname), metadata={"format": "pt"})
            written.append(os.path.join(out, fname))
            del arrays
    if len(shards) > 1:
        written.append(write_index(out, weight_map, total))
    with open(os.path.join(out, CONFIG_FILE), "w") as f:
        f.write(config.to_json_string())
    written.append(os.path.join(out, CONFIG_FILE))
    return written


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True,
                        help="config.json path, a directory holding one, or a preset name in configs/")
    parser.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES), help="tensor dtype (default bfloat16)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-shard-size", default="5GB", help="shard size limit, e.g. 5GB, 500MB (default 5GB)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        config = resolve_config(args.config)
    except (FileNotFoundError, ValueError) as e:
        parser.error(str(e))
    t0 = time.perf_counter()
    try:
        files = make_random_checkpoint(config, args.out, dtype=args.dtype, seed=args.seed,
                                       max_shard_size=args.max_shard_size, progress=not args.no_progress)
    except (FileExistsError, ValueError) as e:
        parser.error(str(e))
    size = sum(os.path.getsize(f) for f in files)
    n_params = sum(int(np.prod(v[1], dtype=np.int64)) for v in hf_param_spec(config).values())
    print(f"wrote {len(files)} files, {size / 1e9:.3f} GB, {n_params:,} params ({args.dtype}) to {args.out} "
          f"in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
