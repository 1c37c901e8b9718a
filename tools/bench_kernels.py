"""Benchmark (not a test): Pallas kernels vs the XLA paths on the same device, with TFLOP/s and % of peak.

    python tools/bench_kernels.py                      # GPU: T = 8k, 32k, 128k (the BENCHMARKS.md table)
    python tools/bench_kernels.py --lens 8192 --only moba
    python tools/bench_kernels.py --smoke              # CPU: tiny shapes in interpret mode, checks the script

Shapes (issue 5): B=1, 32 query / 8 kv heads, head dim 128, bfloat16; MoBA 4096/top-12 and 512/top-4, sliding
window 128, dense causal attention; gated delta rule B=1, H=32 (K=V=128, float32 state, chunk 64).
For each: forward time of ``impl="pallas"`` and ``impl="xla"`` (median of ``--repeats`` after a compiling call),
forward+backward for the attention kernels, and the kernel's TFLOP/s: attention counts ``4 D`` flops per
(query, key) pair the kernel must visit (MoBA: ``T (C topk + tile)``, the gathered kernel's work; the
query-major ``union`` kernel, timed in the "other" column as fwd / fwd+bwd, visits every causal tile on random
inputs), GDN ``2 * 3 K V`` per token and head plus the
intra-chunk terms. Optional baselines in the same run when importable (GPU machine only): the
``flash-linear-attention`` Triton kernel ``chunk_gated_delta_rule`` and ``flash_attn_func`` (dense causal).
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import jax
import jax.numpy as jnp
from tqdm import tqdm

from bench_ops import measure  # same folder: tools/ is sys.path[0] when run as a script

from spb2_jax.ops.gdn_chunked import chunk_gated_delta_rule
from pallas_kernels.block_sparse_flash import BlockSizes
from pallas_kernels.moba import moba_flash_attention
from spb2_jax.ops.moba_blockwise import causal_attention, moba_attention, moba_select_blocks
from spb2_jax.ops.segments import segment_positions
from spb2_jax.ops.swa_blockwise import sliding_window_attention

BACKEND = jax.default_backend()
TARGET = "mosaic_tpu" if BACKEND == "tpu" else "triton"  # the Pallas kernels of this machine
INTERPRET = BACKEND == "cpu"  # no Pallas lowering on CPU: interpret mode (--smoke)
PALLAS = dict(interpret=INTERPRET, target=TARGET)  # what every impl="pallas" call is given

# dense bf16 matmul peaks per chip (vendor sheets), matched as substrings of jax's device_kind, first match wins
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "TPU v4": 275.0, "TPU v5 lite": 197.0,
               "TPU v5p": 459.0, "TPU v5": 459.0, "TPU v6 lite": 918.0}


def _peak() -> float | None:
    kind = jax.devices()[0].device_kind
    return next((v for k, v in PEAK_TFLOPS.items() if k in kind), None)


def _time(fn, args, repeats):
    """Median seconds of ``jax.jit(fn)(*args)`` after a compiling call (``bench_ops.measure``, no memory cap);
    ``inf`` when the device runs out of memory (printed as "OOM")."""
    try:
        return measure(fn, args, repeats, float("inf"))[0]
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        return float("inf")


def _moba_union(q, k, v, *, chunk_size, topk, block_size):
    """MoBA with the query-major ``algorithm="union"`` Pallas kernel (same selection as ``moba_attention``)."""
    seg = jnp.ones(q.shape[:2], jnp.int32)
    sel = moba_select_blocks(jax.lax.stop_gradient(q), jax.lax.stop_gradient(k), chunk_size=chunk_size, topk=topk,
                             segment_ids=seg)
    return moba_flash_attention(q, k, v, sel=sel, seg=seg, pos=segment_positions(seg), chunk_size=chunk_size,
                                block_sizes=BlockSizes.from_request(block_size, q.shape[1]), algorithm="union",
                                **PALLAS)


def _attention_flops(T, N, D, visited_pairs_per_head):
    return 4.0 * D * visited_pairs_per_head * N


def _attn_cases(T, tile):
    causal_pairs = T * (T + 1) / 2
    return {
        "causal": (dict(), causal_pairs),
        "swa-128": (dict(window=128), T * (128 + tile)),  # band: own tile + the tiles covering the window
        "moba-4096/12": (dict(chunk_size=4096, topk=12), min(causal_pairs, T * (4096 * 12 + tile))),
        "moba-512/4": (dict(chunk_size=512, topk=4), min(causal_pairs, T * (512 * 4 + tile))),
    }


def attention_rows(T, args, key):
    B, N, K, D, tile = 1, args.heads, args.kv_heads, args.head_dim, args.tile
    ks = jax.random.split(key, 4)
    q = jax.random.normal(ks[0], (B, T, N, D), jnp.bfloat16)
    k, v = (jax.random.normal(x, (B, T, K, D), jnp.bfloat16) for x in ks[1:3])
    do = jax.random.normal(ks[3], (B, T, N, D), jnp.bfloat16)
    rows = []
    for name, (kw, pairs) in _attn_cases(T, tile).items():
        if args.only and not name.startswith(args.only):
            continue
        if name == "causal":
            op = causal_attention
        elif name.startswith("swa"):
            op = sliding_window_attention
        else:
            op = moba_attention
        res = {}
        impls = {"pallas": functools.partial(op, block_size=tile, impl="pallas", **PALLAS, **kw),
                 "xla": functools.partial(op, block_size=tile, impl="xla", **kw)}
        if name.startswith("moba"):  # the query-major kernel, for comparison with the default (gathered) one
            impls["pallas union kernel"] = functools.partial(_moba_union, block_size=tile, **kw)
        for impl, fwd in impls.items():
            both = lambda q, k, v, fwd=fwd: jax.vjp(fwd, q, k, v)[1](do)  # noqa: E731
            res[impl] = [_time(fwd, (q, k, v), args.repeats), _time(both, (q, k, v), args.repeats)]
        if name.startswith("moba") or name == "causal":
            fa = _flash_attn_time(q, k, v, args.repeats)
            if fa is not None:
                res["flash-attn dense causal"] = [fa, None]
        flops = _attention_flops(T, N, D, pairs) * B
        rows.append((name, T, res, flops, 2.5 * flops))
    return rows


def gdn_rows(T, args, key):
    B, H, Kd = 1, args.heads, args.head_dim
    ks = jax.random.split(key, 5)
    q, k, v = (jax.random.normal(x, (B, T, H, Kd)) for x in ks[:3])
    g = -jax.nn.softplus(jax.random.normal(ks[3], (B, T, H)))
    beta = jax.nn.sigmoid(jax.random.normal(ks[4], (B, T, H)))
    res = {}
    for impl, pallas in (("pallas", PALLAS), ("xla", {})):
        fwd = lambda *a, impl=impl, pallas=pallas: chunk_gated_delta_rule(*a, impl=impl, **pallas)[0]  # noqa: E731
        res[impl] = [_time(fwd, (q, k, v, g, beta), args.repeats), None]
    C = 64
    flops = 2.0 * B * H * T * (3 * Kd * Kd + C * (2 * Kd + Kd + Kd + Kd / 3))
    row = ("gdn", T, res, flops, None)
    fla = _fla_gdn_time(q, k, v, g, beta, args.repeats)
    if fla is not None:
        res["fla-triton"] = [fla, None]
    return [row]


def _fla_gdn_time(q, k, v, g, beta, repeats):
    """fla's Triton ``chunk_gated_delta_rule`` on the same inputs (torch, same GPU), or None if not installed."""
    try:
        import torch
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule as fla_gdn
    except ImportError:
        return None
    tq, tk, tv, tg, tb = (torch.from_dlpack(x) for x in (q, k, v, g, beta))
    return _torch_time(lambda: fla_gdn(tq, tk, tv, tg, tb, use_qk_l2norm_in_kernel=True), repeats)


def _flash_attn_time(q, k, v, repeats):
    """``flash_attn_func(causal=True)`` (dense causal, GQA) on the same inputs, or None if not installed."""
    try:
        import torch
        from flash_attn import flash_attn_func
    except ImportError:
        return None
    tq, tk, tv = (torch.from_dlpack(x) for x in (q, k, v))
    return _torch_time(lambda: flash_attn_func(tq, tk, tv, causal=True), repeats)


def _torch_time(fn, repeats):
    import torch
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _fmt(s):
    if s is None:
        return "-"
    return "OOM" if s == float("inf") else (f"{s * 1e3:.1f} ms" if s < 1 else f"{s:.2f} s")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lens", default="8192,32768,131072")
    p.add_argument("--only", default="", help="prefix of the cases to run: causal, swa, moba, gdn")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--tile", type=int, default=128)
    p.add_argument("--smoke", action="store_true", help="tiny CPU run (interpret mode): checks the script only")
    args = p.parse_args(argv)
    if args.smoke:
        args.lens, args.heads, args.kv_heads, args.head_dim, args.tile, args.repeats = "64", 2, 1, 32, 16, 1
    peak = _peak()
    print(f"device={jax.devices()[0].device_kind} backend={jax.default_backend()} peak={peak} TFLOP/s")
    print("| op | T | pallas fwd | xla fwd | pallas fwd+bwd | xla fwd+bwd | other | pallas fwd TFLOP/s | % peak |")
    print("|---|---|---|---|---|---|---|---|---|")
    for T in tqdm([int(x) for x in args.lens.split(",")], desc="T", leave=False):
        key = jax.random.key(T)
        rows = [] if args.only == "gdn" else attention_rows(T, args, key)
        if not args.only or args.only == "gdn":
            rows += gdn_rows(T, args, key)
        for name, T_, res, flops, _ in rows:
            pf, pb = res["pallas"]
            xf, xb = res["xla"]
            other = "; ".join(f"{k} {_fmt(v[0])}" + (f" / {_fmt(v[1])}" if v[1] is not None else "")
                              for k, v in res.items() if k not in ("pallas", "xla")) or "-"
            tflops = flops / pf / 1e12
            pct = f"{100 * tflops / peak:.1f}%" if peak else "-"
            print(f"| {name} | {T_} | {_fmt(pf)} | {_fmt(xf)} | {_fmt(pb)} | {_fmt(xb)} | {other} | "
                  f"{tflops:.2f} | {pct} |")


if __name__ == "__main__":
    main()
