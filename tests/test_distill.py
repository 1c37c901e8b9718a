"""Distillation (T2H deliverable 3): the tiled KL against float64 NumPy and finite differences, the step with a
frozen teacher, training only the new parameters, and stage chaining (alignment -> KD) through ``train``."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tokenizers import Tokenizer

import spb2_jax
from spb2_jax.checkpoint import load_hf
from spb2_jax.config import SpB2Config
from spb2_jax.model import SpB2ForCausalLM, init_params
from spb2_jax.train.data import TINY_TOKENIZER
from spb2_jax.options import resolve_options
from spb2_jax.t2h import new_param_mask
from spb2_jax.t2h.__main__ import run as t2h_run
from spb2_jax.train import ConfigError, TrainState, load_config, make_train_step, train
from spb2_jax.train.distill import aligned_layers, tiled_kl
from spb2_jax.train.optim import learning_rate, make_optimizer
from spb2_jax.train.step import Teacher
from tests.helpers import REPO, qwen3_fixture_dir

pytestmark = pytest.mark.usefixtures("fast_compiles")


def _kl_inputs(rng, dtype=np.float32, B=2, T=13, Ds=8, Dt=6, V=50):
    hs, ht = rng.normal(size=(B, T, Ds)), rng.normal(size=(B, T, Dt))
    ks, kt = rng.normal(size=(Ds, V)), 1.5 * rng.normal(size=(Dt, V))
    mask = rng.random((B, T)) < 0.7
    return [x.astype(dtype) for x in (hs, ks, ht, kt)] + [mask]


def _kl_numpy(hs, ks, ht, kt, mask, tau):
    """float64 oracle: tau^2 sum_masked sum_v p_t (log p_t - log p_s), p = softmax(logits / tau)."""
    def log_softmax(z):
        z = z - z.max(-1, keepdims=True)
        return z - np.log(np.exp(z).sum(-1, keepdims=True))
    zs = np.einsum("btd,dv->btv", hs.astype(np.float64), ks.astype(np.float64)) / tau
    zt = np.einsum("btd,dv->btv", ht.astype(np.float64), kt.astype(np.float64)) / tau
    ls, lt = log_softmax(zs), log_softmax(zt)
    return tau ** 2 * float(np.sum(np.where(mask, np.sum(np.exp(lt) * (lt - ls), -1), 0.0)))


@pytest.mark.parametrize("tau, tile", [(1.0, 4), (2.5, 13), (0.7, 100)])
def test_tiled_kl_equals_float64_numpy(tau, tile):
    hs, ks, ht, kt, mask = _kl_inputs(np.random.default_rng(0))
    got = float(tiled_kl(*map(jnp.asarray, (hs, ks, ht, kt, mask)), temperature=tau, tile_size=tile))
    want = _kl_numpy(hs, ks, ht, kt, mask, tau)
    # float32 logits of |z| <~ 20 carry ~1e-6 relative error; the per-token KLs are positive sums, so the total's
    # relative error stays ~1e-6: bound 1e-5
    assert want > 1.0 and got == pytest.approx(want, rel=1e-5)


def test_tiled_kl_gradient_matches_finite_differences():
    """float64 (x64): the student-side gradient along a random direction equals the central difference."""
    rng = np.random.default_rng(1)
    with jax.enable_x64(True):
        hs, ks, ht, kt, mask = (jnp.asarray(x) for x in _kl_inputs(rng, np.float64, T=9))
        f = lambda a, b: tiled_kl(a, b, ht, kt, mask, temperature=1.7, tile_size=4)  # noqa: E731
        da, db = jnp.asarray(rng.normal(size=hs.shape)), jnp.asarray(rng.normal(size=ks.shape))
        ga, gb = jax.grad(f, argnums=(0, 1))(hs, ks)
        analytic = float(jnp.sum(ga * da) + jnp.sum(gb * db))
        eps = 1e-6
        numeric = float(f(hs + eps * da, ks + eps * db) - f(hs - eps * da, ks - eps * db)) / (2 * eps)
        assert analytic == pytest.approx(numeric, rel=1e-7)  # O(eps^2) truncation, float64 rounding ~1e-10 / eps
        assert float(f(hs, ks)) == pytest.approx(_kl_numpy(*(np.asarray(x) for x in (hs, ks, ht, kt, mask)), 1.7),
                                                 rel=1e-12)


def _tiny(layers=4, full=(3,), moba=(0,)):
    d = json.loads((REPO / "configs" / "tiny.json").read_text())
    d.update(num_hidden_layers=layers)
    d["attn"] = dict(d["attn"], layers=sorted(set(full) | set(moba)), full_layers=list(full))
    return SpB2Config.from_dict(d)


def _batch(rows=4, T=32, seed=0):
    rng = np.random.default_rng(seed)
    seg = np.ones((rows, T), np.int32)
    seg[:, T // 2:] = 2
    seg[0, -3:] = 0
    return {"input_ids": jnp.asarray(rng.integers(3, 384, (rows, T)).astype(np.int32)),
            "segment_ids": jnp.asarray(seg)}


def _step(config, teacher, trainable=None, microbatches=1):
    opt = load_config(None, ["model.preset=x", "optimizer.lr=1e-2"]).optimizer
    optimizer = make_optimizer(opt, 10, trainable=trainable)
    params = init_params(config, jax.random.key(0))
    state = TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params))
    step = jax.jit(make_train_step(config, resolve_options(config), optimizer, learning_rate(opt, 10),
                                   microbatches=microbatches, loss_tile=8, teacher=teacher))
    return state, step


def test_a_teacher_equal_to_the_student_gives_zero_kl_and_alignment():
    cfg = _tiny(layers=2, full=(1,), moba=(0,))
    teacher = Teacher(SpB2ForCausalLM(cfg, resolve_options(cfg)), temperature=2.0, kl_weight=1.0, ce_weight=0.5,
                      align_weight=1.0)
    state, step = _step(cfg, teacher)
    _, m = step(state, _batch(), state.params)
    assert abs(float(m["kl_loss"])) < 1e-6 and float(m["align_loss"]) == 0.0
    assert float(m["loss"]) == pytest.approx(0.5 * float(m["ce_loss"]) + cfg.aux_loss_coef * float(m["aux_loss"]),
                                             rel=1e-6)


def test_distillation_accumulates_like_one_batch():
    """KL and alignment are sums over tokens divided by the whole batch's counts: 4 microbatches = 1 batch."""
    cfg, tcfg = _tiny(layers=2, full=(1,), moba=(0,)), _tiny(layers=2, full=(0, 1), moba=())
    teacher = Teacher(SpB2ForCausalLM(tcfg, resolve_options(tcfg)), temperature=2.0, kl_weight=1.0,
                      ce_weight=0.3, align_weight=0.5)
    tparams = init_params(tcfg, jax.random.key(7))
    batch = _batch(rows=8, seed=3)
    (_, one), (_, four) = (_step(cfg, teacher, microbatches=m)[1](_step(cfg, teacher, microbatches=m)[0], batch,
                                                                  tparams) for m in (1, 4))
    for k in ("kl_loss", "align_loss", "ce_loss"):  # (the SSE aux is a product of batch means: averaged, stated)
        assert float(four[k]) == pytest.approx(float(one[k]), rel=1e-6), k
    for m in (one, four):
        want = 0.3 * m["ce_loss"] + m["kl_loss"] + 0.5 * m["align_loss"] + cfg.aux_loss_coef * m["aux_loss"]
        assert float(m["loss"]) == pytest.approx(float(want), rel=1e-6)
    assert float(one["kl_loss"]) > 0.01 and float(one["align_loss"]) > 0


def test_train_only_new_leaves_the_copied_params_untouched():
    cfg, tcfg = _tiny(layers=2, full=(), moba=(0,)), _tiny(layers=2, full=(0, 1), moba=())
    teacher = Teacher(SpB2ForCausalLM(tcfg, resolve_options(tcfg)), kl_weight=0.0, align_weight=1.0)
    mask = new_param_mask(cfg)
    state, step = _step(cfg, teacher, trainable=mask)
    new, _ = step(state, _batch(), init_params(tcfg, jax.random.key(7)))
    flat_mask = jax.tree_util.tree_leaves_with_path(mask)
    changed = {jax.tree_util.keystr(p): not np.array_equal(np.asarray(a), np.asarray(b))
               for (p, _), a, b in zip(flat_mask, jax.tree.leaves(new.params), jax.tree.leaves(state.params))}
    trained = {jax.tree_util.keystr(p) for p, m in flat_mask if m}
    assert trained and all(not changed[k] for k in changed if k not in trained)
    assert any(changed[k] for k in trained)
    assert any("A_log" in k for k in trained) and not any("mlp" in k for k in trained)
    assert aligned_layers(cfg) == (0, 1) and aligned_layers(_tiny()) == (0, 1, 2)


@pytest.mark.parametrize("overrides, match", [
    (["distill.teacher=t", "distill.temperature=0"], "distill.temperature=0.0 must be positive"),
    (["distill.align_weight=1"], "distill.teacher is required"),
    (["distill.teacher=t", "distill.kl_weight=0"], "nothing to train on"),
])
def test_distill_config_errors_name_the_field(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, ["model.preset=x", *overrides])


def test_stages_chain_alignment_then_kd_with_a_fresh_optimizer(tmp_path):
    """Convert the Qwen3 fixture, align (new params only) for 3 steps, export, then KD from the export with other
    MoBA settings: the KD run starts from exactly the aligned params and a fresh optimizer (step count 0)."""
    student = json.loads((REPO / "configs" / "tiny.json").read_text())
    student.update(num_hidden_layers=4)  # MoBA, SSE-GDN, full, full (one SSE layer keeps the compile short)
    student["attn"] = dict(student["attn"], layers=[0, 2, 3], full_layers=[2, 3])
    (tmp_path / "student.json").write_text(json.dumps(student))
    converted = tmp_path / "converted"
    t2h_run(str(qwen3_fixture_dir()), str(tmp_path / "student.json"), str(converted), progress=False)
    texts = tmp_path / "texts"
    texts.mkdir()
    for i in range(12):
        (texts / f"t{i}.txt").write_text(f"def f{i}(x):\n    return x * {i} + {i * i}\n" * 4)
    common = [f"distill.teacher={qwen3_fixture_dir()}", f"data.source={texts}", "data.extensions=.txt",
              "data.seq_len=48", "data.batch_size=2", "data.eval_documents=2", "steps=3", "log_every=1",
              "checkpoint_every=3", "eval.every=3", "eval.batches=1", "eval.at_start=true"]
    align = train(load_config(None, [f"run_dir={tmp_path / 'align'}", f"model.checkpoint={converted}",
                                     "distill.kl_weight=0", "distill.align_weight=1",
                                     "distill.train_only_new=true", *common]), export_hf=str(tmp_path / "aligned"))
    _, before = load_hf(converted, progress=False)
    text = "def f(x):\n    return x"  # the run's tokenizer (here the tiny BPE: the fixture has none) is exported
    assert spb2_jax.load_pretrained(tmp_path / "aligned").encode(text) == Tokenizer.from_file(
        TINY_TOKENIZER).encode(text, add_special_tokens=False).ids
    mask = new_param_mask(SpB2Config.from_pretrained(converted))
    for m, a, b in zip(jax.tree.leaves(mask), jax.tree.leaves(align.state.params), jax.tree.leaves(before)):
        assert np.array_equal(np.asarray(a), np.asarray(b)) != m  # new ones moved, copied ones did not
    records = [json.loads(line) for line in open(tmp_path / "align" / "metrics.jsonl")]
    assert records[0]["step"] == 0 and "eval_kl" in records[0] and "align_loss" in records[1]

    kd_student = dict(student, attn=dict(student["attn"], moba_chunk_size=8, moba_topk=3))
    (tmp_path / "kd.json").write_text(json.dumps(kd_student))
    kd = load_config(None, [f"run_dir={tmp_path / 'kd'}", f"model.preset={tmp_path / 'kd.json'}",
                            f"model.init_from={tmp_path / 'aligned'}", "distill.temperature=2",
                            "distill.ce_weight=0.5", "optimizer.warmup_steps=2", *common[:-4], "steps=1",
                            "checkpoint_every=1"])
    result = train(kd)  # warmup: the first step's learning rate is 0, so its params are the initial ones
    assert result.resumed_from is None
    for a, b in zip(jax.tree.leaves(result.state.params), jax.tree.leaves(align.state.params), strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))  # the aligned params flowed into the KD stage
    counts = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(result.state.opt_state)
              if "count" in jax.tree_util.keystr(path)]
    assert counts and all(int(c) == 1 for c in counts)  # a fresh optimizer: one step of this stage, not 3 + 1
    kd_records = [json.loads(line) for line in open(tmp_path / "kd" / "metrics.jsonl")]
    assert kd_records[0]["kl_loss"] > 0 and "align_loss" in kd_records[0]


def test_a_teacher_that_cannot_be_aligned_is_refused_before_step_0(tmp_path):
    """The Qwen3 fixture (4 layers) cannot be aligned layer by layer with the 6-layer tiny hybrid."""
    from spb2_jax.train import TrainError

    config = load_config(None, [f"run_dir={tmp_path / 'run'}", f"model.preset={REPO / 'configs' / 'tiny.json'}",
                                f"distill.teacher={qwen3_fixture_dir()}", "distill.align_weight=1",
                                "data.source=python-stdlib", "data.max_documents=10", "steps=1"])
    with pytest.raises(TrainError, match="the teacher has 4 layers of width 64, the student 6 of width 64"):
        train(config)
    assert not os.path.exists(tmp_path / "run" / "checkpoints")


@pytest.mark.slow
def test_sharded_distillation_equals_one_device(tmp_path):
    """The teacher is placed by the same rules as the student: 5 distillation steps (KL at temperature 2 + CE) on
    ``fsdp=2,sequence=2,data=2`` (8 forced CPU devices) equal the 1-device losses within 1e-5."""
    import subprocess
    import sys

    docs = tmp_path / "docs"
    docs.mkdir()
    rng = np.random.default_rng(0)
    for i in range(24):
        np.save(docs / f"doc{i:02d}.npy", rng.integers(3, 384, rng.integers(10, 150)).astype(np.int32))
    proc = subprocess.run([sys.executable, "-m", "tests.train_worker", str(tmp_path / "runs"), str(docs), "5",
                           "fsdp=2,sequence=2,data=2", "--", f"distill.teacher={qwen3_fixture_dir()}",
                           "distill.temperature=2", "distill.ce_weight=0.5"], cwd=REPO, capture_output=True,
                          text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = json.loads(proc.stdout.strip().splitlines()[-1])
    one, sharded = losses[""], losses["fsdp=2,sequence=2,data=2"]
    assert len(one) == len(sharded) == 5
    assert np.max(np.abs(np.subtract(sharded, one))) <= 1e-5 * max(map(abs, one)), (sharded, one)
