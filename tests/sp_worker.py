"""Sequence-parallel checks on 8 forced CPU devices, run in a subprocess by ``tests/test_sequence_parallel.py``
(the device count must be set before jax is imported). ``python -m tests.sp_worker TASK [ARGS]`` prints one JSON
object ``{case: value}`` on its last line; the test asserts on it.

Tasks:
  ops [P:T...]             every sequence-parallel mixer vs its 1-device twin on awkward segmentations at each
                           (shards, length) point (default: all of GRID); forward and gradients, max relative
                           error per case
  forward FIXTURE:SPEC...  the sharded model forward of official fixtures vs the 1-device forward (float32)
  grads FIXTURE:SPEC...    loss and gradients w.r.t. every parameter, sharded vs 1 device, in float64
  decode FIXTURE:SPEC[:generate]...
                           sharded prefill of a prompt then teacher-forced cached decode steps vs the 1-device
                           no-cache forward (float32); with ``:generate`` also ``Model.generate`` under the mesh
  errors                   the error message of each bad input (unknown axis, wrong sizes, batch vs data)
  vl SPEC...               the SpB2.0-VL tiny-vl fixture (a two-row left-padded batch, one image per row) loaded
                           onto each mesh vs one device (float32, no bf16 q/k rounding); max relative logit error
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import dataclasses  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import spb2_jax as spb2  # noqa: E402
from spb2_jax.checkpoint import load_hf  # noqa: E402
from spb2_jax.generate import decode_step, init_cache, prefill  # noqa: E402
from spb2_jax.model import loss_fn  # noqa: E402
from spb2_jax.ops import dispatch  # noqa: E402
from spb2_jax.ops.segments import Segments  # noqa: E402
from spb2_jax.options import Kernels  # noqa: E402
from spb2_jax.parallel import make_mesh, parse_mesh_spec, use_rules  # noqa: E402
from spb2_jax.parallel.placement import place_params  # noqa: E402
from tests.helpers import fixture_dir  # noqa: E402


def mesh_for(spec: str):
    """``make_mesh(spec)`` over the first devices (the product of the sizes)."""
    n = math.prod(parse_mesh_spec(spec).values())
    return make_mesh(spec, devices=jax.devices()[:n])


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b), initial=0.0) / max(np.max(np.abs(b), initial=0.0), 1e-30))


# ------------------------------------------------------------------ ops

def _segment_cases(T: int, P: int) -> dict[str, np.ndarray]:
    """``[2, T]`` segment ids for P shards of ``L = ceil(T / P)`` tokens (the padded layout the wrappers use)."""
    L = -(-T // P)
    cases = {}
    ids = np.ones((2, T), np.int32)
    ids[:, L:] = 2  # a segment boundary exactly at a shard boundary
    cases["boundary_at_shard"] = ids
    ids = np.ones((2, T), np.int32)
    ids[:, 1:] = 2  # segment 2 spans every later shard (>= 3 shards when P >= 4)
    start = min(2, P - 1) * L
    ids[1, start] = 3  # row 1: a length-1 segment at a shard start
    ids[1, start + 1:] = 4
    cases["long_and_length1"] = ids
    ids = np.ones((2, T), np.int32)
    ids[0, :3] = 0  # left padding
    ids[0, T - 2:] = 0  # right padding
    ids[1, L // 2:L // 2 + 3] = 0  # padding inside a row splits it
    ids[1, L // 2 + 3:] = 5
    cases["padding"] = ids
    return cases


def _inputs(T: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    B, N, K, H, V = 2, 4, 2, 8, 6  # GQA 2 for the attention ops; the recurrences use N heads, key dim H
    f = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)  # noqa: E731
    return dict(q=f(B, T, N, H), k=f(B, T, N, H), v=f(B, T, N, V), ka=f(B, T, K, H), va=f(B, T, K, H),
                g=jnp.asarray(-rng.uniform(0.01, 0.7, (B, T, N)), jnp.float32),
                beta=jnp.asarray(rng.uniform(0.05, 0.95, (B, T, N)), jnp.float32),
                gk=jnp.asarray(-rng.uniform(0.01, 0.7, (B, T, N, H)), jnp.float32),
                w=f(B, T, N, V), wa=f(B, T, N, H), ws=f(B, N, H, V))


OP_WINDOW, OP_CHUNK, OP_TOPK = 7, 4, 2
# (P, T): T = 37 is not a multiple of any P; P = 8 gives 5-token shards, shorter than the SWA window (7) and than
# two MoBA blocks; T = P: one token per shard
GRID = ((2, 37), (4, 37), (8, 37), (4, 4))


def _op_fns(x):
    """name -> (scalar of the op's outputs as a function of (kernels, segments, float inputs), those inputs)."""

    def gdn(kern, seg, q, k, v, g, beta):
        o, s = dispatch.gated_delta_rule(q, k, v, g, beta, segments=seg, kernels=kern)
        return jnp.sum(o * x["w"]) + jnp.sum(s * x["ws"])

    def gla(kern, seg, q, k, v, gk):
        o, s = dispatch.gla(q, k, v, gk, segments=seg, kernels=kern)
        return jnp.sum(o * x["w"]) + jnp.sum(s * x["ws"])

    def swa(kern, seg, q, k, v):
        return jnp.sum(dispatch.window_attention(q, k, v, window=OP_WINDOW, segments=seg, kernels=kern) * x["wa"])

    def moba(kern, seg, q, k, v):
        return jnp.sum(dispatch.moba(q, k, v, chunk_size=OP_CHUNK, topk=OP_TOPK, segments=seg, kernels=kern)
                       * x["wa"])

    def full(kern, seg, q, k, v):
        return jnp.sum(dispatch.full_attention(q, k, v, segments=seg, kernels=kern) * x["wa"])

    att = (x["q"], x["ka"], x["va"])
    return {"gdn": (gdn, (x["q"], x["k"], x["v"], x["g"], x["beta"])), "gla": (gla, (x["q"], x["k"], x["v"], x["gk"])),
            "swa": (swa, att), "moba": (moba, att), "full": (full, att)}


def task_ops(*points: str) -> dict[str, float]:
    """Per (op, P, T, segmentation): max relative error of the value and of every input gradient, in float64
    (where two correct evaluation orders agree to ~1e-15 of the result times the conditioning; a wrong summary,
    halo or segment cut is O(1))."""
    jax.config.update("jax_enable_x64", True)
    jax.config.update("jax_disable_most_optimizations", True)  # many small programs: compile time dominates
    out = {}
    base = Kernels.resolve("xla", dtype="float64", chunk_size=OP_CHUNK, block_size=4)
    grid = [tuple(map(int, p.split(":"))) for p in points] or GRID
    for P, T in grid:
        mesh = mesh_for(f"sequence={P}")
        sharded = dataclasses.replace(base, sequence_shards=P)
        x = jax.tree.map(lambda a: a.astype(jnp.float64), _inputs(T, seed=P + T))
        cases = _segment_cases(T, P) if T > 2 * P else {"one_segment": np.ones((2, T), np.int32)}
        for name, (fn, args) in _op_fns(x).items():
            vg = jax.value_and_grad(fn, argnums=tuple(range(2, len(args) + 2)))
            one = jax.jit(lambda seg, *a, vg=vg: vg(base, seg, *a))
            with use_rules(mesh):
                par = jax.jit(lambda seg, *a, vg=vg: vg(sharded, seg, *a))
                for seg_name, ids in cases.items():
                    seg = Segments.from_ids(jnp.asarray(ids))
                    v1, g1 = one(seg, *args)
                    vp, gp = par(seg, *args)
                    assert vp.dtype == jnp.float64
                    out[f"{name}-P{P}-T{T}-{seg_name}"] = max([rel(vp, v1)] + [rel(a, b) for a, b in zip(gp, g1)])
    return out


# ------------------------------------------------------------------ model

def _fixture(name: str):
    inputs = np.load(fixture_dir(name) / "inputs.npz")
    mask = inputs["attention_mask"] if "attention_mask" in inputs else None
    return inputs["input_ids"], inputs["labels"], mask


def _pairs(pairs):
    """``("tiny:sequence=2", "tiny:data=2,sequence=4", ...)`` -> ``{fixture: [spec, ...]}``."""
    out = {}
    for pair in pairs:
        name, spec = pair.split(":", 1)
        out.setdefault(name, []).append(spec)
    return out


def task_forward(*pairs: str) -> dict[str, float]:
    out = {}
    for name, specs in _pairs(pairs).items():
        out |= _forward(name, specs)
    return out


def task_grads(*pairs: str) -> dict[str, float]:
    out = {}
    for name, specs in _pairs(pairs).items():
        out |= _grads(name, specs)
    return out


def _forward(name: str, specs) -> dict[str, float]:
    ids, _, mask = _fixture(name)
    ref = np.asarray(spb2.load_pretrained(fixture_dir(name))(ids, mask).logits)
    out = {}
    for spec in specs:
        model = spb2.load_pretrained(fixture_dir(name), mesh=mesh_for(spec))
        assert model.options.sequence_parallel == (parse_mesh_spec(spec)["sequence"] > 1)
        out[f"{name}-{spec}"] = rel(model(ids, mask).logits, ref)
    return out


def _grads(name: str, specs) -> dict[str, float]:
    """float64: the SSE router / gate gradients are ill-conditioned (tests/helpers.py), so two correct float32
    evaluations in different orders differ by up to ~6e-5 of the leaf there; in float64 that is ~1e-9."""
    jax.config.update("jax_enable_x64", True)
    ids, labels, mask = _fixture(name)
    config, params = load_hf(fixture_dir(name), progress=False)
    params = jax.tree.map(lambda p: jnp.asarray(p, jnp.float64), params)
    ids, labels = jnp.asarray(ids), jnp.asarray(labels)
    mask = None if mask is None else jnp.asarray(mask)

    def step(options):
        return jax.jit(jax.value_and_grad(lambda p: loss_fn(p, config, ids, labels, mask, options=options)[0]))

    l1, g1 = step(spb2.resolve_options(config, dtype="float64", param_dtype="float64"))(params)
    out = {}
    for spec in specs:
        mesh = mesh_for(spec)
        options = spb2.resolve_options(config, dtype="float64", param_dtype="float64", mesh=mesh)
        with use_rules(mesh):
            lp, gp = step(options)(place_params(params, config, mesh))
        leaves = [rel(a, b) for a, b in zip(jax.tree.leaves(gp), jax.tree.leaves(g1))]
        assert jax.tree.leaves(gp)[0].dtype == jnp.float64
        out[f"{name}-{spec}-loss"] = rel(lp, l1)
        out[f"{name}-{spec}-grads"] = max(leaves)
    return out


def task_decode(*pairs: str) -> dict[str, float]:
    """Prefill the first ``T0`` tokens (the fixture's padding mask included) with the sequence-sharded model into
    a sequence-sharded cache, then decode the remaining tokens one by one (teacher forcing); every real token's
    logits vs the 1-device no-cache forward of the whole input."""
    out = {}
    for name, specs in _pairs(pairs).items():
        ids, _, mask = _fixture(name)
        B, T = ids.shape
        want = None
        ref = np.asarray(spb2.load_pretrained(fixture_dir(name))(ids, mask).logits)
        valid = np.ones((B, T), bool) if mask is None else mask.astype(bool)
        T0 = T - 5  # prompt length: not a multiple of the shard counts for the fixtures' T
        for spec in specs:
            spec, _, with_generate = spec.partition(":")
            mesh = mesh_for(spec)
            model = spb2.load_pretrained(fixture_dir(name), mesh=mesh)
            with use_rules(mesh):
                cache = init_cache(model.config, B, T + 3, model.options.dtype, mesh=mesh)
                first, cache = prefill(model.params, model.config, ids[:, :T0], cache, valid[:, :T0],
                                       all_logits=True, options=model.options)
                steps = [np.asarray(first)]
                kv = [c for c in cache.layers if hasattr(c, "block_sums")]
                assert kv and all(c.k.sharding.spec[2] == "sequence" for c in kv), [c.k.sharding for c in kv]
                for t in range(T0, T):
                    logits, cache = decode_step(model.params, model.config, ids[:, t:t + 1], cache,
                                                options=model.options)
                    steps.append(np.asarray(logits))
            got = np.concatenate(steps, axis=1)
            keep = valid.copy()
            keep[:, T0:] = True  # decode steps: every row's token is real
            assert valid[:, T0:].all(), "the decoded tail must have no padding"
            out[f"{name}-{spec}"] = rel(got[keep], ref[keep])
            if with_generate:  # Model.generate under the mesh (sharded prefill, sharded cache): the same tokens
                assert with_generate == "generate", with_generate
                prompts = [ids[0, :37].tolist(), ids[1, 50:61].tolist()]
                if want is None:
                    want = spb2.load_pretrained(fixture_dir(name)).generate(prompts, max_new_tokens=6)
                out[f"{name}-{spec}-generate-mismatch"] = float(model.generate(prompts, max_new_tokens=6) != want)
    return out


# ------------------------------------------------------------------ errors

def task_errors() -> dict[str, str]:
    out = {}
    for case, spec in (("unknown_axis", "data=2,pipeline=4"), ("wrong_product", "data=2,sequence=2"),
                       ("malformed", "data:2")):
        try:
            make_mesh(spec)
            out[case] = "no error"
        except ValueError as e:
            out[case] = str(e)
    model = spb2.load_pretrained(mesh=make_mesh("data=2,sequence=4"))
    try:
        model(np.ones((3, 8), np.int32))
        out["batch_vs_data"] = "no error"
    except ValueError as e:
        out["batch_vs_data"] = str(e)
    return out


# ------------------------------------------------------------------ VL

def task_vl(*specs: str) -> dict:
    from tests.helpers import SHARED

    path = SHARED / "fixtures" / "official-vl" / "tiny-vl"
    i = np.load(path / "inputs.npz")
    one = spb2.load_pretrained(path, official_qk_bf16=False)
    cfg = one.config
    rng = np.random.default_rng(1)
    other, grid = spb2.vision.patchify(rng.integers(0, 256, (32, 48, 3), dtype=np.uint8), cfg.vision)
    short = [1, 40, 41, cfg.vision_start_token_id] + [cfg.image_token_id] * 6 + [cfg.vision_end_token_id, 42, 43]
    long = i["input_ids"][0].tolist()
    pad = len(long) - len(short)
    ids = np.asarray([long, [0] * pad + short])
    mask = np.asarray([[1] * len(long), [0] * pad + [1] * len(short)])
    kw = dict(pixel_values=np.concatenate([i["pixel_values"], other]),
              image_grid_thw=np.concatenate([i["image_grid_thw"], grid[None]]))
    want = np.asarray(one(ids, mask, **kw).logits)
    out = {}
    for spec in specs:
        model = spb2.load_pretrained(path, official_qk_bf16=False, mesh=mesh_for(spec))
        got = np.asarray(jax.device_get(model(ids, mask, **kw).logits))
        out[spec] = rel(np.where(mask[..., None] == 1, got, 0), np.where(mask[..., None] == 1, want, 0))
    return out


if __name__ == "__main__":
    task, args = sys.argv[1], sys.argv[2:]
    result = {"ops": task_ops, "forward": task_forward, "grads": task_grads, "decode": task_decode,
              "errors": task_errors, "vl": task_vl}[task](*args)
    print(json.dumps(result))
