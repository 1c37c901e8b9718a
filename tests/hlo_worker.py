"""Collective traffic of sequence-parallel programs on 8 forced CPU devices, read from the compiled HLO
(``spb2_jax.parallel.hlo_stats``); run in a subprocess by ``tests/test_parallel_hlo.py`` (the device count must be
set before jax is imported). ``python -m tests.hlo_worker TASK [ARGS]`` prints one JSON object on its last line.

Programs are compiled, never run. Every ``[B, T, ...]`` input (activations and the ``Segments`` fields, which the
model builds once per forward) comes in sharded over the mesh axis ``sequence``; parameters are replicated.

Tasks:
  known                 a tiny ``shard_map`` program with one collective of each kind, sizes known by construction
  programs P SPEC...    per (program, pass, T): bytes per collective kind and the all-gather results of the
                        sequence-parallel ops ``gdn``, ``gla``, ``swa``, the layers ``sse_gdn_layer``,
                        ``sse_gla_layer`` (SSE + SWA) and ``gathered`` (``sequence.gathered_attention``, the
                        all-gather first version of full attention: the case the check must reject);
                        SPEC = ``NAME[,NAME...]:T[,T...][:fwd|grad]``
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import dataclasses  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import AxisType, NamedSharding, PartitionSpec  # noqa: E402

import spb2_jax as spb2  # noqa: E402
from spb2_jax.config import LayerKind, SpB2Config  # noqa: E402
from spb2_jax.layers.sse_swa import SSESWAMixer  # noqa: E402
from spb2_jax.ops import dispatch  # noqa: E402
from spb2_jax.options import Kernels  # noqa: E402
from spb2_jax.parallel import hlo_stats, make_mesh, sequence, use_rules  # noqa: E402
from tests.helpers import REPO  # noqa: E402

SEQ = "sequence"
# op shapes: batch 1, 4 heads (recurrences: 4 heads of K = V = 128; attention: 4 query / 2 kv heads of 64)
B, N, HK, KV, HA = 1, 4, 128, 2, 64
WINDOW = 128
LOOP_TRIPS = 5
LAYER_CONFIG = REPO / "configs" / "small-8l.json"  # D 256, 4 heads of 64, 4 SSE partitions, window 128


# ------------------------------------------------------------------ known sizes

def task_known() -> dict:
    """One collective of each kind inside ``shard_map`` over 4 devices, float32 (XLA:CPU may widen a narrower
    dtype around a collective-permute, so the sizes are only known by construction in float32):

    all-gather f32[8,16] -> [32,16] (2048 B); all-reduce f32[5,3] (60 B); collective-permute f32[7,2] (56 B), and
    f32[5,2] (40 B) in a ``fori_loop`` of ``LOOP_TRIPS`` trips; all-to-all f32[4,6] (96 B); reduce-scatter
    f32[8,16] -> [2,16] (128 B)."""
    mesh = jax.make_mesh((4,), ("s",), devices=jax.devices()[:4], axis_types=(AxisType.Explicit,))

    ring = [(i, (i + 1) % 4) for i in range(4)]

    def body(x, y, z, w, u, n):
        a = jax.lax.all_gather(x, "s", axis=0, tiled=True)
        b = jax.lax.psum(y, "s")
        c = jax.lax.ppermute(z, "s", ring)
        d = jax.lax.all_to_all(w, "s", 0, 0, tiled=True)
        e = jax.lax.psum_scatter(x, "s", scatter_dimension=0, tiled=True)
        f = jax.lax.fori_loop(0, LOOP_TRIPS, lambda i, u: jax.lax.ppermute(u, "s", ring) * 1.5, u)
        return (a.sum() + b.sum() + c.sum() + d.sum() + e.sum() + f.sum())[None]

    fn = jax.shard_map(body, mesh=mesh, in_specs=(PartitionSpec("s"),) * 6, out_specs=PartitionSpec("s"))
    shard = NamedSharding(mesh, PartitionSpec("s"))
    args = [jax.ShapeDtypeStruct(s, jnp.float32, sharding=shard)
            for s in ((32, 16), (20, 3), (28, 2), (16, 6), (20, 2), (4,))]
    text = jax.jit(fn).lower(*args).compile().as_text()
    return {"bytes": hlo_stats.collective_bytes(text), "counts": hlo_stats.collective_counts(text),
            "all_gathers": hlo_stats.all_gather_shapes(text),
            "static_bytes": hlo_stats.collective_bytes(text, per_run=False),
            "static_counts": hlo_stats.collective_counts(text, per_run=False)}


# ------------------------------------------------------------------ sequence-parallel programs

def _program(name: str, P: int, T: int, mesh):
    """``(f(params, segments, *inputs) -> outputs, params (abstract) or None, input shapes)`` of program ``name``."""
    kern = dataclasses.replace(Kernels.resolve("xla"), sequence_shards=P)
    rec = ((B, T, N, HK),) * 3
    att = ((B, T, N, HA), (B, T, KV, HA), (B, T, KV, HA))
    if name == "gdn":
        return (lambda _, seg, q, k, v, g, beta: dispatch.gated_delta_rule(q, k, v, g, beta, segments=seg,
                                                                           kernels=kern),
                None, rec + ((B, T, N), (B, T, N)))
    if name == "gla":
        return lambda _, seg, q, k, v, gk: dispatch.gla(q, k, v, gk, segments=seg, kernels=kern), None, rec + (rec[0],)
    if name == "swa":
        return (lambda _, seg, q, k, v: dispatch.window_attention(q, k, v, window=WINDOW, segments=seg, kernels=kern),
                None, att)
    if name == "gathered":  # the all-gather first version (kept as the ring attention's simple twin)
        local = dataclasses.replace(kern, sequence_shards=1)
        return (lambda _, seg, q, k, v: sequence.gathered_attention(
            lambda q, k, v, segments: dispatch.full_attention(q, k, v, segments=segments, kernels=local),
            q, k, v, segments=seg, shards=P), None, att)
    kind = {"sse_gdn_layer": LayerKind.SSE_GDN, "sse_gla_layer": LayerKind.SSE_GLA}[name]
    config = SpB2Config.from_json_file(LAYER_CONFIG).replace(
        swa_dropout=0.0, linear_attn_type="gdn" if kind == LayerKind.SSE_GDN else "gla")
    options = spb2.resolve_options(config, mesh=mesh)
    assert options.kernels.sequence_shards == P
    mixer = SSESWAMixer(config, kind, options)
    one = SSESWAMixer(config, kind, spb2.resolve_options(config))  # the same params, initialised on 1 device
    params = jax.eval_shape(lambda: one.init(jax.random.key(0), jnp.zeros((B, 8, config.hidden_size)),
                                             spb2.Segments.from_ids(jnp.ones((B, 8), jnp.int32))))["params"]

    def layer(params, seg, x):
        out, aux, _ = mixer.apply({"params": params}, x, seg)
        return out, aux

    return layer, params, ((B, T, config.hidden_size),)


def _scalar(out) -> jax.Array:
    """A loss of the program's outputs that involves every element (weights differ per element)."""
    total = 0.0
    for i, x in enumerate(jax.tree.leaves(out)):
        w = jnp.cos(jnp.arange(x.size, dtype=jnp.float32).reshape(x.shape) * (0.37 + i))
        total = total + jnp.sum(x.astype(jnp.float32) * w)
    return total


def _compile(fn, params, shapes, T, mesh, grad: bool) -> str:
    seq = NamedSharding(mesh, PartitionSpec(None, SEQ))
    rep = NamedSharding(mesh, PartitionSpec())
    seg = spb2.Segments(*(jax.ShapeDtypeStruct((B, T), jnp.int32, sharding=seq) for _ in range(3)))
    xs = [jax.ShapeDtypeStruct(s, jnp.float32, sharding=seq) for s in shapes]
    ps = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype, sharding=rep), params)
    if grad:  # gradients w.r.t. the parameters and every float input, kept sharded like the inputs
        def program(params, seg, *xs):
            return jax.grad(lambda p, xs: _scalar(fn(p, seg, *xs)), argnums=(0, 1))(params, xs)
        out_shardings = (jax.tree.map(lambda _: rep, params), tuple(seq for _ in xs))
    else:
        def program(params, seg, *xs):
            return fn(params, seg, *xs)
        out_shardings = None
    with use_rules(mesh):
        return jax.jit(program, out_shardings=out_shardings).lower(ps, seg, *xs).compile().as_text()


def task_programs(P: str, *specs: str) -> dict:
    """``P`` shards; each spec ``NAME[,NAME...]:T[,T...][:PASS]`` compiles those programs at those lengths, the
    forward and the gradient (PASS ``fwd`` or ``grad``: only that one).
    Returns ``{"NAME-PASS-T": {"bytes", "counts" (per run), "all_gathers": [[dtype, dims, op_name], ...],
    "unknown_trips": [op_name of each collective in a loop of unknown trip count]}}``."""
    jax.config.update("jax_disable_most_optimizations", True)  # backend (LLVM) only: the HLO passes all run
    P = int(P)
    mesh = make_mesh(f"{SEQ}={P}", devices=jax.devices()[:P])
    out = {}
    for spec in specs:
        names, lengths, *only = spec.split(":")
        passes = [p == "grad" for p in only] or [False, True]
        for T in map(int, lengths.split(",")):
            for name in names.split(","):
                fn, params, shapes = _program(name, P, T, mesh)
                for grad in passes:
                    text = _compile(fn, params, shapes, T, mesh, grad)
                    out[f"{name}-{'grad' if grad else 'fwd'}-T{T}"] = {
                        "bytes": hlo_stats.collective_bytes(text), "counts": hlo_stats.collective_counts(text),
                        "all_gathers": [[dtype, dims, c.op_name] for c in hlo_stats.all_gathers(text)
                                        for dtype, dims in c.shapes],
                        "unknown_trips": [c.op_name for c in hlo_stats.collectives(text) if c.executions is None]}
    return out


if __name__ == "__main__":
    task, args = sys.argv[1], sys.argv[2:]
    result = {"known": task_known, "programs": task_programs}[task](*args)
    print(json.dumps(result))
