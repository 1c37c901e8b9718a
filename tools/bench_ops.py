"""Benchmark (not a test): fast token-mixing paths against the references, on this machine.

    python tools/bench_ops.py                       # everything (the BENCHMARKS.md table)
    python tools/bench_ops.py --only gdn --gdn-lens 1024,4096

1. Gated delta rule, B=1, H=4, K=V=128: ``chunk_gated_delta_rule`` (C=64) vs the per-token ``lax.scan``
   reference, forward and forward+backward (``jax.grad`` of ``sum(o * w)``), T = 1k, 4k, 16k.
2. Sliding-window attention (window 128) and MoBA (block 512, top-4), B=1, 4 query / 2 kv heads, head dim 64
   (the ``configs/small-8l.json`` shape): the blockwise paths vs the dense-mask references, T = 4k, 16k, 64k.
   ``moba``: the default XLA path (gathered form, ``spb2_jax.ops.moba_gathered``), forward and forward+backward;
   ``moba-union``: the query-tile union loop it replaced (``algorithm="union"``), so both are measured in the same
   run; ``--only moba-xla`` gives the two side by side without the dense references (for the largest T).

Times: median of ``--repeats`` calls after a compiling call (``jax.jit``, ``block_until_ready``).
Memory: XLA's own accounting of the compiled program (``compiled.memory_analysis()``): temporary buffers plus
outputs, i.e. the peak the computation needs on top of its inputs. It is read without running, so a dense
reference too large to run (``--max-run-gib``) still gets its memory figure and no time.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import time

import jax
import jax.numpy as jnp
from tqdm import tqdm

from spb2_jax.ops.attention import attention_reference
from spb2_jax.ops.gdn_chunked import chunk_gated_delta_rule
from spb2_jax.ops.moba import moba_attention_reference
from spb2_jax.ops.moba_blockwise import moba_attention
from spb2_jax.ops.recurrent import gated_delta_rule_reference
from spb2_jax.ops.swa_blockwise import sliding_window_attention

GiB = 2 ** 30


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def measure(fn, args, repeats: int, max_run_gib: float) -> tuple[float | None, float]:
    """(median seconds or None if not run, XLA peak bytes = temp + output) of ``jax.jit(fn)(*args)``."""
    compiled = jax.jit(fn).lower(*args).compile()
    mem = compiled.memory_analysis()
    peak = float(mem.temp_size_in_bytes + mem.output_size_in_bytes)
    if peak > max_run_gib * GiB:
        return None, peak
    jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times), peak


def gdn_rows(lens, repeats, max_run_gib):
    B, H, K = 1, 4, 128
    rows = []
    for T in tqdm(lens, desc="gdn", leave=False):
        ks = jax.random.split(jax.random.key(T), 6)
        q, k, v = (jax.random.normal(x, (B, T, H, K)) for x in ks[:3])
        g = -jax.nn.softplus(jax.random.normal(ks[3], (B, T, H)))
        beta = jax.nn.sigmoid(jax.random.normal(ks[4], (B, T, H)))
        w = jax.random.normal(ks[5], (B, T, H, K))
        for mode in ("fwd", "fwd+bwd"):
            res = {}
            for name, op in (("chunked", chunk_gated_delta_rule), ("sequential", gated_delta_rule_reference)):
                if mode == "fwd":
                    fn = lambda q, k, v, g, b, op=op: op(q, k, v, g, b)[0]  # noqa: E731
                else:
                    fn = jax.grad(lambda q, k, v, g, b, op=op: jnp.sum(op(q, k, v, g, b)[0] * w),  # noqa: E731
                                  argnums=(0, 1, 2, 3, 4))
                res[name] = measure(fn, (q, k, v, g, beta), repeats, max_run_gib)
            rows.append(("gdn", mode, T, res["chunked"], res["sequential"]))
    return rows


def attn_rows(lens, repeats, max_run_gib, which, moba_passes=("fwd", "fwd+bwd")):
    B, N, Kh, D = 1, 4, 2, 64
    rows = []
    for T in tqdm(lens, desc="attention", leave=False):
        ks = jax.random.split(jax.random.key(T), 3)
        q = jax.random.normal(ks[0], (B, T, N, D))
        k, v = (jax.random.normal(x, (B, T, Kh, D)) for x in ks[1:])
        w = jax.random.normal(jax.random.key(T + 1), (B, T, N, D))
        moba = lambda algorithm: lambda q, k, v: moba_attention(q, k, v, chunk_size=512, topk=4,  # noqa: E731
                                                                algorithm=algorithm)
        moba_ref = lambda q, k, v: moba_attention_reference(q, k, v, chunk_size=512, topk=4)  # noqa: E731
        ops = {
            "swa": (lambda q, k, v: sliding_window_attention(q, k, v, window=128),
                    lambda q, k, v: attention_reference(q, k, v, window=128)),
            "moba": (moba("gathered"), moba_ref),
            "moba-union": (moba("union"), moba_ref),
            "moba-xla": (moba("gathered"), moba("union")),  # the new path vs the one it replaced
        }
        for name in which:
            fast, ref = ops[name]
            modes = moba_passes if name.startswith("moba") else ("fwd",)
            for mode in modes:
                if mode == "fwd+bwd":
                    fast, ref = (jax.grad(lambda q, k, v, f=f: jnp.sum(f(q, k, v) * w), argnums=(0, 1, 2))
                                 for f in (fast, ref))
                rows.append((name, mode, T, measure(fast, (q, k, v), repeats, max_run_gib),
                             measure(ref, (q, k, v), repeats, max_run_gib)))
    return rows


def _fmt_t(t):
    return "not run" if t is None else f"{t * 1e3:.1f} ms" if t < 1 else f"{t:.2f} s"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["gdn", "swa", "moba", "moba-union", "moba-xla"], action="append",
                        help="default: gdn, swa, moba, moba-union")
    parser.add_argument("--gdn-lens", type=_ints, default=[1024, 4096, 16384])
    parser.add_argument("--attn-lens", type=_ints, default=[4096, 16384, 65536])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--moba-passes", type=lambda s: tuple(s.split(",")), default=("fwd", "fwd+bwd"),
                        help="MoBA rows: fwd, fwd+bwd or both (the union path's backward at 64k takes many minutes)")
    parser.add_argument("--max-run-gib", type=float, default=12.0,
                        help="do not run programs whose XLA peak exceeds this (memory is still reported)")
    args = parser.parse_args(argv)
    which = args.only or ["gdn", "swa", "moba", "moba-union"]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(f"backend={jax.default_backend()} devices={jax.devices()} commit={commit or '?'}")
    rows = []
    if "gdn" in which:
        rows += gdn_rows(args.gdn_lens, args.repeats, args.max_run_gib)
    attn = [w for w in which if w != "gdn"]
    if attn:
        rows += attn_rows(args.attn_lens, args.repeats, args.max_run_gib, attn, args.moba_passes)
    print("| op | pass | T | fast time | fast XLA peak | reference time | reference XLA peak | speed-up |")
    print("|---|---|---|---|---|---|---|---|")
    for op, mode, T, (tf, mf), (tr, mr) in rows:
        ratio = f"{tr / tf:.1f}x" if tf and tr else "-"
        print(f"| {op} | {mode} | {T} | {_fmt_t(tf)} | {mf / GiB:.3f} GiB | {_fmt_t(tr)} | {mr / GiB:.3f} GiB "
              f"| {ratio} |")


if __name__ == "__main__":
    main()
