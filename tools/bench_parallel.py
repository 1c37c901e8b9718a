"""Benchmark (not a test): sequence parallelism on forced CPU devices: per-device compiled peak memory, forward
time and collective bytes per layer kind vs T, for P = 1, 2, 4, 8 shards of the time axis.

    python tools/bench_parallel.py [--config configs/small-8l.json] [--lengths 4096,16384,65536]
        [--shards 1,2,4,8] [--budget-gib 2] [--time-max-len 16384] [--repeats 3] [--max-memory-gib 16]

What is measured, per model variant (the config as given, and "sse-swa-only": the same config with
``attn.layers = attn.full_layers = []``, so every layer is an SSE (``linear_attn_type``) + SWA layer of the same
widths) and per (P, T), batch 1, float32, random official-style init:

- the forward ``SpB2ForCausalLM.apply(..., output_logits=False).last_hidden_state`` (the final normed hidden
  states, what the tiled loss takes; no ``[B, T, V]`` logits), jitted under ``use_rules(mesh)`` with the mesh
  ``sequence=P`` over the first P devices, token ids sharded over ``sequence``, parameters placed by the rules
  table (replicated on this mesh);
- per-device peak = ``compiled.memory_analysis()`` temp + arguments + outputs (XLA's buffer assignment of the
  partitioned per-device program; compiling only, nothing allocated);
- collective bytes per layer kind (``spb2_jax.parallel.hlo_stats``, per run: a collective inside a loop counts
  once per trip) of that compiled program: each collective is attributed to the layer named in its ``op_name``
  (``.../layers_3/...``), divided by the number of layers of that kind; collectives outside the layers are
  "model" (building the segments);
- forward time: median of ``--repeats`` runs after one warm-up run, for T <= ``--time-max-len`` and programs whose
  peak over all P devices fits ``--run-max-gib`` (8 forced devices share this machine's CPU cores: the times say
  what the program costs here, not a speed-up);
- the largest T (a multiple of ``--search-step``) whose 1-device peak fits ``--budget-gib``, and at that T the
  P = 8 / P = 1 peak ratio (per device), with the buffers' breakdown.

Memory-only compiles use ``jax_disable_most_optimizations`` (LLVM codegen effort only: the HLO passes and the
buffer assignment, so the memory numbers and the HLO, are unchanged); timed programs are compiled normally.
"""

from __future__ import annotations

import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections import defaultdict  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from spb2_jax.config import SpB2Config  # noqa: E402
from spb2_jax.model import SpB2ForCausalLM, abstract_params, init_params  # noqa: E402
from spb2_jax.options import resolve_options  # noqa: E402
from spb2_jax.parallel import hlo_stats, make_mesh, use_rules  # noqa: E402
from spb2_jax.parallel.mesh import token_sharding  # noqa: E402
from spb2_jax.parallel.placement import param_shardings  # noqa: E402

GIB = 2**30
MIB = 2**20
_LAYER = re.compile(r"/layers_(\d+)/")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def variants(config: SpB2Config) -> dict[str, SpB2Config]:
    """The config as given and its SSE + SWA-only twin (no MoBA / full attention layers)."""
    return {"config": config, "sse-swa-only": config.replace(attn={"layers": (), "full_layers": ()})}


@dataclasses.dataclass
class Program:
    config: SpB2Config
    P: int
    T: int
    mesh: jax.sharding.Mesh
    forward: object  # jitted
    params: object  # abstract, with shardings
    ids: jax.ShapeDtypeStruct


def program(config: SpB2Config, P: int, T: int) -> Program:
    if T % P:
        raise ValueError(f"{T=} must be a multiple of {P=} (the model would pad it)")
    mesh = make_mesh(f"sequence={P}", devices=jax.devices()[:P])
    model = SpB2ForCausalLM(config, resolve_options(config, mesh=mesh))
    params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_params(config),
                          param_shardings(config, mesh))
    ids = jax.ShapeDtypeStruct((1, T), jnp.int32, sharding=token_sharding(mesh))
    forward = jax.jit(lambda p, x: model.apply({"params": p}, x, output_logits=False).last_hidden_state)
    return Program(config, P, T, mesh, forward, params, ids)


def compile_program(prog: Program, fast: bool):
    old = jax.config.values["jax_disable_most_optimizations"]
    jax.config.update("jax_disable_most_optimizations", fast)
    try:
        with use_rules(prog.mesh):
            return prog.forward.lower(prog.params, prog.ids).compile()
    finally:
        jax.config.update("jax_disable_most_optimizations", old)


def peak(compiled) -> dict[str, int]:
    """Per-device bytes: temp, arguments, outputs and their sum (the compiled program's peak)."""
    m = compiled.memory_analysis()
    out = {"temp": m.temp_size_in_bytes, "args": m.argument_size_in_bytes, "outputs": m.output_size_in_bytes,
           "alias": m.alias_size_in_bytes}
    out["peak"] = out["temp"] + out["args"] + out["outputs"]
    return out


def layer_bytes(hlo_text: str, config: SpB2Config) -> dict[str, dict[str, int]]:
    """``{layer kind or "model": {collective kind: bytes per layer of that kind}}`` (module docstring)."""
    per_layer: dict[int, dict[str, int]] = defaultdict(lambda: dict.fromkeys(hlo_stats.COLLECTIVES, 0))
    for c in hlo_stats.collectives(hlo_text):
        m = _LAYER.search(c.op_name)
        per_layer[int(m[1]) if m else -1][c.kind] += c.nbytes * (c.executions or 1)
    kinds = config.layer_kinds
    out: dict[str, dict[str, int]] = {}
    for kind in sorted(set(kinds)):
        layers = [i for i, k in enumerate(kinds) if k == kind]
        totals = [per_layer[i] for i in layers]
        spread = {k: max(t[k] for t in totals) - min(t[k] for t in totals) for k in hlo_stats.COLLECTIVES}
        if any(spread.values()):
            log(f"    note: the {kind} layers {layers} differ by up to {spread} bytes (mean reported)")
        out[kind] = {k: sum(t[k] for t in totals) // len(layers) for k in hlo_stats.COLLECTIVES}
    out["model"] = dict(per_layer[-1]) if -1 in per_layer else dict.fromkeys(hlo_stats.COLLECTIVES, 0)
    return out


def measure(config: SpB2Config, P: int, T: int, *, with_hlo: bool = True) -> dict:
    t0 = time.perf_counter()
    compiled = compile_program(program(config, P, T), fast=True)
    out = {"P": P, "T": T, "compile_s": time.perf_counter() - t0, **peak(compiled)}
    if with_hlo:
        text = compiled.as_text()
        out["collectives"] = hlo_stats.collective_bytes(text)
        out["layers"] = layer_bytes(text, config)
        out["big_all_gathers"] = [(c.shapes, c.op_name) for c in hlo_stats.all_gathers(text)
                                  if any(d >= T // P for _, dims in c.shapes for d in dims)]
        out["unknown_trips"] = [c.op_name for c in hlo_stats.collectives(text) if c.executions is None]
    return out


def time_forward(config: SpB2Config, P: int, T: int, repeats: int) -> dict:
    prog = program(config, P, T)
    params = jax.device_put(init_params(config, jax.random.key(0)), param_shardings(config, prog.mesh))
    ids = jax.device_put(np.random.default_rng(0).integers(0, config.vocab_size, (1, T), dtype=np.int32),
                         prog.ids.sharding)
    t0 = time.perf_counter()
    compiled = compile_program(prog, fast=False)
    compile_s = time.perf_counter() - t0
    runs = []
    for i in range(repeats + 1):  # the first run is the warm-up
        t0 = time.perf_counter()
        compiled(params, ids).block_until_ready()
        if i:
            runs.append(time.perf_counter() - t0)
    return {"compile_s": compile_s, "runs_s": runs, "median_s": statistics.median(runs)}


def largest_fitting(config: SpB2Config, P: int, budget: int, step: int, limit: int, cache: dict) -> int:
    """The largest multiple of ``step`` (<= ``limit``) whose P-device per-device peak fits ``budget`` (0: none);
    the peak is assumed to grow with T (doubling, then bisection)."""
    def fits(T):
        if (P, T) not in cache:
            cache[(P, T)] = measure(config, P, T, with_hlo=False)
        log(f"    search P={P} T={T}: peak {cache[(P, T)]['peak'] / GIB:.3f} GiB")
        return cache[(P, T)]["peak"] <= budget

    if not fits(step):
        return 0
    lo, hi = step, 2 * step
    while hi <= limit and fits(hi):
        lo, hi = hi, 2 * hi
    hi = min(hi, limit + step)
    while hi - lo > step:  # lo fits, hi does not (or is past the limit)
        mid = (lo + hi) // 2 // step * step
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def fmt_mib(b: int) -> str:
    return f"{b / MIB:,.1f}"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/small-8l.json", help="config.json path")
    parser.add_argument("--lengths", default="4096,16384,65536", help="T values of the memory / HLO tables")
    parser.add_argument("--shards", default="1,2,4,8", help="P values (mesh sequence=P over the first P devices)")
    parser.add_argument("--budget-gib", type=float, default=2.0, help="per-device compiled-peak budget")
    parser.add_argument("--search-step", type=int, default=4096, help="T granularity of the largest-T search")
    parser.add_argument("--search-max", type=int, default=1 << 20, help="largest T the search tries")
    parser.add_argument("--search-shards", default="1,8",
                        help="P values whose largest fitting T is searched ('': none)")
    parser.add_argument("--time-max-len", type=int, default=16384, help="time the forward only up to this T")
    parser.add_argument("--run-max-gib", type=float, default=6.0,
                        help="run (time) a program only if its peak summed over the P devices fits this")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs after the warm-up run")
    parser.add_argument("--max-memory-gib", type=float, default=12.0,
                        help="address-space limit of this process (RLIMIT_AS); 0: none")
    parser.add_argument("--json", default=None, help="also write every measurement to this file")
    args = parser.parse_args(argv)

    if args.max_memory_gib > 0:
        limit = int(args.max_memory_gib * GIB)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    lengths = [int(t) for t in args.lengths.split(",")]
    shards = [int(p) for p in args.shards.split(",")]
    if max(shards + [8]) > jax.device_count():
        raise SystemExit(f"P = {max(shards + [8])} needs as many devices, there are {jax.device_count()}")
    budget = int(args.budget_gib * GIB)
    base = SpB2Config.from_json_file(args.config)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                           text=True).stdout.strip()
    log(f"commit {commit}{' (+ uncommitted changes)' if dirty else ''}; jax {jax.__version__}, "
        f"{jax.device_count()} {jax.default_backend()} devices, {os.cpu_count()} CPU cores")
    results = {"commit": commit, "dirty": bool(dirty), "config": args.config, "args": vars(args), "variants": {}}

    for name, config in variants(base).items():
        log(f"== {name}: layers {','.join(config.layer_kinds)}")
        res = results["variants"][name] = {"layer_kinds": list(config.layer_kinds), "table": [], "search": {}}
        for T in lengths:
            for P in shards:
                log(f"  compile P={P} T={T} ...")
                row = measure(config, P, T)
                log(f"    peak {row['peak'] / MIB:,.1f} MiB/device (temp {row['temp'] / MIB:,.1f}) "
                    f"compile {row['compile_s']:.1f} s; collectives {row['collectives']}")
                if T <= args.time_max_len and row["peak"] * P <= args.run_max_gib * GIB:
                    row["time"] = time_forward(config, P, T, args.repeats)
                    log(f"    forward {row['time']['median_s'] * 1e3:,.0f} ms (median of {args.repeats})")
                res["table"].append(row)
        cache: dict = {(r["P"], r["T"]): r for r in res["table"]}  # the table's compiles count for the search
        for P in (int(p) for p in args.search_shards.split(",") if p):
            log(f"  largest T for P={P} under {args.budget_gib} GiB ...")
            res["search"][P] = largest_fitting(config, P, budget, args.search_step, args.search_max, cache)
            log(f"    P={P}: T={res['search'][P]}")
        T1 = res["search"].get(1)
        if T1:
            one = cache.get((1, T1)) or measure(config, 1, T1, with_hlo=False)
            eight = cache.get((8, T1)) or measure(config, 8, T1, with_hlo=False)
            res["at_largest"] = {"T": T1, "P1": one, "P8": eight,
                                 "ratio": eight["peak"] / one["peak"]}
            log(f"    at T={T1}: P=8 / P=1 peak = {res['at_largest']['ratio']:.3f}")

    print_report(results, shards, lengths, args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1, default=str)


def print_report(results: dict, shards, lengths, args) -> None:
    print(f"commit {results['commit']}{' (+ uncommitted changes)' if results['dirty'] else ''}, "
          f"config {results['config']}, budget {args.budget_gib} GiB per device")
    for name, res in results["variants"].items():
        print(f"\n### {name} ({','.join(res['layer_kinds'])})\n")
        print("Per-device compiled peak (temp + args + outputs), MiB; forward time (median) where run\n")
        print("| T | " + " | ".join(f"P={P}" for P in shards) + " |")
        print("|---|" + "---|" * len(shards))
        rows = {(r["P"], r["T"]): r for r in res["table"]}
        for T in lengths:
            cells = []
            for P in shards:
                r = rows[(P, T)]
                cell = fmt_mib(r["peak"])
                if "time" in r:
                    cell += f" / {r['time']['median_s'] * 1e3:,.0f} ms"
                cells.append(cell)
            print(f"| {T} | " + " | ".join(cells) + " |")
        print(f"\nCollective bytes per layer and forward run (P = {max(shards)}; a collective in a loop counts once "
              "per trip), by layer kind and collective kind\n")
        Pmax = max(shards)
        kinds = [k for k in res["table"][0]["layers"]]
        print("| T | layer kind | " + " | ".join(hlo_stats.COLLECTIVES) + " |")
        print("|---|---|" + "---|" * len(hlo_stats.COLLECTIVES))
        for T in lengths:
            r = rows[(Pmax, T)]
            for kind in kinds:
                b = r["layers"][kind]
                print(f"| {T} | {kind} | " + " | ".join(f"{b[k]:,}" for k in hlo_stats.COLLECTIVES) + " |")
        for T in lengths:
            big, unknown = rows[(Pmax, T)]["big_all_gathers"], rows[(Pmax, T)]["unknown_trips"]
            if big:
                print(f"\nT={T}, P={Pmax}: all-gathers with a T-sized result: {big}")
            if unknown:
                print(f"\nT={T}, P={Pmax}: collectives in loops of unknown trip count (counted once): {unknown}")
        print(f"\nLargest T fitting {args.budget_gib} GiB per device: "
              + ", ".join(f"P={P}: {T}" for P, T in res["search"].items()))
        at = res.get("at_largest")
        if at:
            one, eight = at["P1"], at["P8"]
            print(f"\nAt T={at['T']}: P=1 peak {fmt_mib(one['peak'])} MiB (temp {fmt_mib(one['temp'])}, args "
                  f"{fmt_mib(one['args'])}, outputs {fmt_mib(one['outputs'])}); P=8 peak {fmt_mib(eight['peak'])} "
                  f"MiB (temp {fmt_mib(eight['temp'])}, args {fmt_mib(eight['args'])}, outputs "
                  f"{fmt_mib(eight['outputs'])}); P=8 / P=1 = {at['ratio']:.3f} (temp alone: "
                  f"{eight['temp'] / one['temp']:.3f})")


if __name__ == "__main__":
    main()
