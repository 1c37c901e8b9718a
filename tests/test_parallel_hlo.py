"""Collective traffic of the sequence-parallel mixers, read from the compiled HLO (``spb2_jax.parallel.hlo_stats``).

Acceptance (DESIGN.md, sequence parallelism: "communication independent of T"): from the compiled HLO, the
collective bytes of GDN, GLA and SWA are equal at T = 2k and T = 8k over P = 4 shards, forward and gradient, and
no all-gather of a T-sized activation appears (no all-gather result has a dimension >= T / P, the length of one
shard). Bytes are per run of the program (a collective in a loop counts once per trip). The programs are
compiled, not run, in a subprocess with 8 forced CPU devices (``tests/hlo_worker.py``): the ops by default, the
whole SSE + SWA layer modules in a slow test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from spb2_jax.parallel import hlo_stats
from tests.helpers import REPO

P = 4
LENGTHS = (2048, 8192)


def _worker(*args: str) -> dict:
    proc = subprocess.run([sys.executable, "-m", "tests.hlo_worker", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=900, env=os.environ.copy())
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def violations(stats: dict, name: str, lengths: tuple[int, ...], shards: int) -> list[str]:
    """What breaks "communication independent of T" for program ``name`` in the worker's ``stats`` (each pass it
    holds: forward, gradient): bytes per run of a collective kind that differ between the lengths (a collective
    in a loop counts once per trip), collectives in loops of unknown trip count (their bytes per run are not
    known), and all-gathers with a T-sized result (a dimension >= T / shards)."""
    found = []
    for pass_ in [p for p in ("fwd", "grad") if f"{name}-{p}-T{lengths[0]}" in stats]:
        by_t = {T: stats[f"{name}-{pass_}-T{T}"] for T in lengths}
        first = by_t[lengths[0]]["bytes"]
        for T, s in by_t.items():
            changed = {k: (first[k], b) for k, b in s["bytes"].items() if b != first[k]}
            if changed:
                found.append(f"{name} {pass_}: bytes (T={lengths[0]}, T={T}) differ: {changed}")
            if s["unknown_trips"]:
                found.append(f"{name} {pass_} T={T}: collectives in loops of unknown trip count {s['unknown_trips']}")
            big = [g for g in s["all_gathers"] if any(d >= T // shards for d in g[1])]
            if big:
                found.append(f"{name} {pass_} T={T}: T-sized all-gathers {big}")
    return found


# ------------------------------------------------------------------ the parser

SYNTHETIC = """\
HloModule synthetic, entry_computation_layout={(f32[8,16]{1,0}, f32[5,3]{1,0})->f32[]}

%async_computation (param_0: f32[8,16]) -> f32[2,16] {
  %param_0 = f32[8,16]{1,0} parameter(0)
  ROOT %reduce-scatter.1 = f32[2,16]{1,0} reduce-scatter(%param_0), channel_id=3, replica_groups={{0,1,2,3}}, \
dimensions={0}, to_apply=%add
}

ENTRY %main (p0: f32[8,16], p1: f32[5,3]) -> f32[] {
  %p0 = f32[8,16]{1,0} parameter(0)
  %p1 = f32[5,3]{1,0} parameter(1)
  %all-gather-start = (f32[8,16]{1,0}, f32[32,16]{1,0}) all-gather-start(%p0), channel_id=1, \
replica_groups={{0,1,2,3}}, dimensions={0}, metadata={op_name="jit(f)/all_gather"}
  %all-gather-done = f32[32,16]{1,0} all-gather-done(%all-gather-start), metadata={op_name="jit(f)/all_gather"}
  %all-reduce-start = f32[5,3]{1,0} all-reduce-start(%p1), channel_id=2, to_apply=%add
  %all-reduce-done = f32[5,3]{1,0} all-reduce-done(%all-reduce-start)
  %all-reduce.2 = (f32[], bf16[4,4]{1,0}, s32[2]{0}) all-reduce(%a, %b, %c), channel_id=4, to_apply=%add
  %collective-permute-start = (f32[7,2]{1,0}, f32[7,2]{1,0}, u32[], u32[]) collective-permute-start(%x), \
channel_id=5, source_target_pairs={{0,1},{1,2}}
  %collective-permute-done = f32[7,2]{1,0} collective-permute-done(%collective-permute-start)
  %reduce-scatter-start = ((f32[8,16]{1,0}), f32[2,16]{1,0}) async-start(%p0), calls=%async_computation
  %reduce-scatter-done = f32[2,16]{1,0} async-done(%reduce-scatter-start), calls=%async_computation
  %all-to-all = (f32[1,6]{1,0}, f32[1,6]{1,0}) all-to-all(%y, %z), channel_id=6, replica_groups={{0,1}}
  %gte = f32[1,6]{1,0} get-tuple-element(%all-to-all), index=0, metadata={op_name="all-gather(x)"}
  %while = (s32[], f32[3]{0}) while(%init), condition=%cond, body=%outer_body, \
backend_config={"known_trip_count":{"n":"4"}}
  %unknown = (s32[], f32[3]{0}) while(%init), condition=%cond, body=%unknown_body
  ROOT %r = f32[] constant(0)
}
"""
# callees are printed before their callers, as XLA does
LOOPS = """\
%inner_body (p: (s32[], f32[3])) -> (s32[], f32[3]) {
  %cp = f32[3]{0} collective-permute(%x), channel_id=7, source_target_pairs={{0,1}}
}

%outer_body (p: (s32[], f32[3])) -> (s32[], f32[3]) {
  %ar = f32[2]{0} all-reduce(%x), channel_id=8, to_apply=%add
  %inner = (s32[], f32[3]{0}) while(%init), condition=%cond, body=%inner_body, \
backend_config={"known_trip_count":{"n":"3"}}
}

%unknown_body (p: (s32[], f32[3])) -> (s32[], f32[3]) {
  %ag = s32[8]{0} all-gather(%x), channel_id=9, dimensions={0}
}

"""


def test_parser_counts_async_pairs_once_sums_tuples_and_multiplies_loops():
    """GPU-style text: asynchronous start / done pairs, an ``async-start`` wrapper, tuple results, nested loops
    with known trip counts (4 x 3) and a loop without one."""
    text = SYNTHETIC.replace("ENTRY", LOOPS + "ENTRY")
    static = {
        "all-gather": 32 * 16 * 4 + 8 * 4,
        "all-reduce": 5 * 3 * 4 + (4 + 4 * 4 * 2 + 2 * 4) + 2 * 4,
        "collective-permute": 7 * 2 * 4 + 3 * 4,
        "all-to-all": 2 * 6 * 4,
        "reduce-scatter": 2 * 16 * 4,
    }
    assert hlo_stats.collective_bytes(text, per_run=False) == static
    per_run = static | {"all-reduce": static["all-reduce"] + 3 * 2 * 4,  # the outer body runs 4 times
                        "collective-permute": 7 * 2 * 4 + 12 * 3 * 4}  # the inner one 4 x 3
    assert hlo_stats.collective_bytes(text) == per_run
    assert hlo_stats.collective_counts(text) == {"all-gather": 2, "all-reduce": 6, "collective-permute": 13,
                                                 "all-to-all": 1, "reduce-scatter": 1}
    assert hlo_stats.collective_counts(text, per_run=False) == {"all-gather": 2, "all-reduce": 3,
                                                                "collective-permute": 2, "all-to-all": 1,
                                                                "reduce-scatter": 1}
    assert [c.executions for c in hlo_stats.all_gathers(text)] == [None, 1]  # unknown_body first: text order
    assert hlo_stats.all_gather_shapes(text) == [("s32", (8,)), ("f32", (32, 16))]
    assert [c.op_name for c in hlo_stats.all_gathers(SYNTHETIC)] == ["jit(f)/all_gather"]
    assert hlo_stats.parse_shapes("(f32[], (bf16[2,<=3]{1,0}, pred[4]))") == (("f32", ()), ("bf16", (2, 3)),
                                                                                ("pred", (4,)))


def test_parser_on_a_compiled_shard_map_program_of_known_sizes():
    """One collective of each kind over 4 CPU devices, sizes known by construction (``tests/hlo_worker.py``)."""
    known = _worker("known")
    trips = 5  # LOOP_TRIPS: a ppermute of 40 B in a fori_loop
    assert known["bytes"] == {"all-gather": 2048, "all-reduce": 60, "collective-permute": 56 + trips * 40,
                              "all-to-all": 96, "reduce-scatter": 128}
    assert known["counts"] == dict.fromkeys(hlo_stats.COLLECTIVES, 1) | {"collective-permute": 1 + trips}
    assert known["all_gathers"] == [["f32", [32, 16]]]
    if known["static_counts"]["collective-permute"] == 2:  # XLA kept the loop (else it unrolled it)
        assert known["static_bytes"]["collective-permute"] == 56 + 40


# ------------------------------------------------------------------ the acceptance test

def test_collective_bytes_of_gdn_gla_swa_do_not_depend_on_T():
    """The sequence-parallel ops (B=1; GDN / GLA: 4 heads, K = V = 128; SWA: 4 / 2 heads of 64, window 128),
    forward and gradient: the same bytes per collective kind at T = 2048 and T = 8192 (P = 4), no T-sized
    all-gather; and they do communicate (the summaries / halo).

    The check can fail: ``sequence.gathered_attention`` (the all-gather first version of full attention, kept as
    the ring attention's simple twin; forward at T = 512, 2048, compiled in the same worker run) all-gathers
    T-sized K / V / queries and its bytes grow with T. (One test, one worker run: the programs compile once.)"""
    stats = _worker("programs", str(P), f"gdn,gla,swa:{','.join(map(str, LENGTHS))}", "gathered:512,2048:fwd")
    for name in ("gdn", "gla", "swa"):
        assert not violations(stats, name, LENGTHS, P)
        for pass_ in ("fwd", "grad"):
            assert stats[f"{name}-{pass_}-T{LENGTHS[0]}"]["bytes"]["collective-permute"] > 0, name
    assert "gathered-fwd-T512" in stats and "gathered-grad-T512" not in stats
    found = violations(stats, "gathered", (512, 2048), P)
    assert any("bytes" in v and "all-gather" in v for v in found), found
    assert any("T-sized all-gathers" in v for v in found), found


@pytest.mark.slow(reason="compiles the forward and gradient of two whole SSE + SWA layers at T = 2k and 8k (~35 s)")
def test_collective_bytes_of_sse_layers_do_not_depend_on_T():
    """The real layer modules (``SSESWAMixer`` of ``configs/small-8l.json``: SSE-GDN + SWA and SSE-GLA + SWA,
    parameters replicated, their gradients all-reduced) at T = 2048 and 8192, P = 4. (Before 51e4a24 the SSE
    router's ``lax.top_k`` made XLA all-gather the router probabilities ``[B, T, P]`` here.)"""
    stats = _worker("programs", str(P), f"sse_gdn_layer,sse_gla_layer:{','.join(map(str, LENGTHS))}")
    found = violations(stats, "sse_gdn_layer", LENGTHS, P) + violations(stats, "sse_gla_layer", LENGTHS, P)
    assert not found, found
