#!/usr/bin/env python
"""Peak host memory and time of ``spb2_jax.checkpoint.load_hf`` on a checkpoint directory.

The load runs in a fresh child process so that nothing else is resident. The child records its resident set
size (RSS) after ``import jax, spb2_jax`` and JAX backend start-up (the *baseline*), loads the checkpoint
(``jax.block_until_ready`` on every leaf), then reports its peak RSS (``getrusage(RUSAGE_SELF).ru_maxrss``),
the parameter bytes and the load time. The parent cross-checks the peak with the child's own rusage from
``os.wait4`` and prints a table with the ratio peak / parameter bytes, raw and net of the baseline.

Example::

    python tools/bench_load_memory.py /work/tmp_ckpt/spb2-5b-random [--dtype bfloat16] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time


def _rss_bytes() -> int:
    """Current resident set size of this process (``VmRSS``)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("VmRSS not found in /proc/self/status")


def _peak_rss_bytes(who: int = resource.RUSAGE_SELF) -> int:
    """Peak RSS (``ru_maxrss``, KiB on Linux) in bytes."""
    return resource.getrusage(who).ru_maxrss * 1024


def child(path: str, dtype: str | None) -> dict:
    """Runs in the fresh process: baseline, load, peak. Returns the measurements."""
    t_import = time.perf_counter()
    import jax  # noqa: PLC0415 - the import itself is part of the baseline
    import numpy as np  # noqa: PLC0415

    import spb2_jax  # noqa: F401, PLC0415
    from spb2_jax.checkpoint import load_hf  # noqa: PLC0415

    jax.devices()  # start the backend before the baseline so it is not charged to loading
    import_s = time.perf_counter() - t_import
    baseline_rss, baseline_peak = _rss_bytes(), _peak_rss_bytes()
    t0 = time.perf_counter()
    config, params = load_hf(path, dtype=None if dtype is None else np.dtype(getattr(jax.numpy, dtype)),
                             progress=False)
    jax.block_until_ready(params)
    load_s = time.perf_counter() - t0
    leaves = jax.tree_util.tree_leaves(params)
    return {
        "checkpoint": os.path.abspath(path),
        "n_tensors": len(leaves),
        "n_params": int(sum(x.size for x in leaves)),
        "param_bytes": int(sum(x.nbytes for x in leaves)),
        "dtypes": sorted({str(x.dtype) for x in leaves}),
        "baseline_rss": baseline_rss,
        "baseline_peak_rss": baseline_peak,
        "peak_rss": _peak_rss_bytes(),
        "rss_after_load": _rss_bytes(),
        "import_s": import_s,
        "load_s": load_s,
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "num_layers": config.num_hidden_layers,
    }


def _mem_total() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    return 0


def _disk_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path)
               if f.endswith(".safetensors"))


def run(path: str, dtype: str | None = None) -> dict:
    """Measure ``load_hf(path, dtype)`` in a fresh subprocess; returns the measurements (see ``child``)."""
    cmd = [sys.executable, os.path.abspath(__file__), "--child", path] + (["--dtype", dtype] if dtype else [])
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    stdout = proc.stdout.read()
    proc.stdout.close()
    # wait4 gives this child's own rusage (RUSAGE_CHILDREN would mix in every earlier child of this process)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"the loading subprocess failed with exit code {proc.returncode}: {' '.join(cmd)}")
    result = json.loads(stdout.strip().splitlines()[-1])
    result["wait4_peak_rss"] = usage.ru_maxrss * 1024
    result["peak_rss"] = max(result["peak_rss"], result["wait4_peak_rss"])
    result["ratio_raw"] = result["peak_rss"] / result["param_bytes"]
    result["ratio_net"] = (result["peak_rss"] - result["baseline_rss"]) / result["param_bytes"]
    result["disk_bytes"] = _disk_bytes(path)
    result["machine"] = f"{platform.machine()}, {os.cpu_count()} CPUs, {_mem_total() / 2**30:.1f} GiB RAM"
    result["python"] = platform.python_version()
    return result


def format_table(r: dict) -> str:
    """A readable table of one measurement."""
    gb = lambda b: f"{b / 1e9:.3f} GB ({b / 2**30:.3f} GiB)"  # noqa: E731
    rows = [
        ("checkpoint", r["checkpoint"]),
        ("machine", r["machine"]),
        ("jax / backend / python", f"{r['jax']} / {r['backend']} / {r['python']}"),
        ("tensors / params", f"{r['n_tensors']} / {r['n_params']:,} ({', '.join(r['dtypes'])})"),
        ("safetensors on disk", gb(r["disk_bytes"])),
        ("parameter bytes", gb(r["param_bytes"])),
        ("baseline RSS (import jax, spb2_jax)", gb(r["baseline_rss"])),
        ("peak RSS", gb(r["peak_rss"])),
        ("RSS after load", gb(r["rss_after_load"])),
        ("peak / param bytes (raw)", f"{r['ratio_raw']:.3f}"),
        ("(peak - baseline) / param bytes (net)", f"{r['ratio_net']:.3f}"),
        ("load time", f"{r['load_s']:.1f} s ({r['param_bytes'] / r['load_s'] / 1e9:.2f} GB/s)"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="HF checkpoint directory (config.json + safetensors)")
    parser.add_argument("--dtype", default=None, choices=["bfloat16", "float32", "float16"],
                        help="load_hf(dtype=...) cast (default: keep the stored dtypes)")
    parser.add_argument("--json", default=None, help="also write the measurements to this JSON file")
    parser.add_argument("--max-ratio", type=float, default=None,
                        help="exit with status 1 if the raw peak / param bytes ratio exceeds this")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.checkpoint, args.dtype)))
        return 0
    if not os.path.isdir(args.checkpoint):
        parser.error(f"{args.checkpoint!r} is not a directory")
    result = run(args.checkpoint, args.dtype)
    print(format_table(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    if args.max_ratio is not None and result["ratio_raw"] > args.max_ratio:
        print(f"FAIL: peak RSS is {result['ratio_raw']:.3f}x the parameter bytes (> {args.max_ratio})")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
