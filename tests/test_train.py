"""Training (``spb2_jax.train``): config and CLI errors, packing isolation, gradient accumulation, the finiteness
guard, and exact resume after SIGKILL (a subprocess killed mid-run, also while a save is in flight)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from spb2_jax.config import SpB2Config
from spb2_jax.model import SpB2ForCausalLM, abstract_params, init_params
from spb2_jax.options import resolve_options
from spb2_jax.train import ConfigError, NonFiniteLoss, TrainError, TrainState, load_config, make_train_step, train
from spb2_jax.train import data as data_lib
from spb2_jax.train.__main__ import main as cli_main
from spb2_jax.train.config import DataSection
from spb2_jax.train.optim import decays, learning_rate, make_optimizer
from spb2_jax.train.step import targets
from tests.helpers import REPO, free_port

TINY = os.path.join(REPO, "configs", "tiny.json")
pytestmark = pytest.mark.usefixtures("fast_compiles")  # many small programs; subprocesses get the same setting


def _tiny3_dict() -> dict:
    """configs/tiny.json cut to 3 layers: MoBA, SSE-GDN + SWA, full (every kind; about a third of the compile)."""
    d = json.load(open(TINY))
    d.update(num_hidden_layers=3)
    d["attn"] = dict(d["attn"], layers=[0, 2], full_layers=[2])
    return d


def _run_config(tmp_path, *extra):
    """A small run on pre-tokenised documents: 8 steps of 4 rows x 64 tokens of the 3-layer tiny hybrid."""
    docs = tmp_path / "docs"
    docs.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(24):
        np.save(docs / f"doc{i:02d}.npy", rng.integers(3, 384, rng.integers(10, 150)).astype(np.int32))
    return load_config(None, [f"run_dir={tmp_path / 'run'}", f"model.preset={_tiny3(tmp_path)}", f"data.source={docs}",
                              "data.format=npy", "data.extensions=.npy", "data.seq_len=64", "data.batch_size=4",
                              "data.eval_documents=2", "steps=8", "checkpoint_every=2", "log_every=1",
                              "optimizer.lr=3e-3", "optimizer.warmup_steps=2", *extra])


# ----------------------------------------------------------------------------------------------- config, CLI

@pytest.mark.parametrize("overrides,match", [
    (["steps=0"], "steps=0 must be positive"),
    (["optimizer.lr=fast"], "optimizer.lr='fast' must be a number"),
    (["optimizer.schedule=step"], "optimizer.schedule='step' must be one of"),
    (["data.batch_size=6", "data.microbatches=4"], "data.batch_size=6 is not a multiple of data.microbatches=4"),
    (["data.sequence_length=4"], "unknown key data.sequence_length"),
    (["model.preset=a.json", "model.checkpoint=b"], "exactly one of model.preset and model.checkpoint"),
    (["steps"], "override 'steps' must look like key=value"),
])
def test_config_errors_name_the_field_and_value(overrides, match):
    base = [] if any(o.startswith("model.") for o in overrides) else [f"model.preset={TINY}"]
    with pytest.raises(ConfigError, match=match):
        load_config(None, base + overrides)


def test_yaml_and_overrides_build_the_config(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(f"model:\n  preset: {TINY}\nsteps: 5\ndata:\n  seq_len: 32\n")
    c = load_config(path, ["steps=7", "optimizer.lr=1e-4", "data.extensions=.txt,.md", "mesh=fsdp=2"])
    assert (c.steps, c.data.seq_len, c.optimizer.lr, c.data.extensions, c.mesh) == (7, 32, 1e-4, (".txt", ".md"),
                                                                                      "fsdp=2")


def test_cli_prints_one_error_line(tmp_path, capsys):
    assert cli_main(["--config", str(tmp_path / "missing.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: --config {tmp_path / 'missing.yaml'}: no such file"]
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert cli_main([f"model.preset={TINY}", f"run_dir={blocker / 'run'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: run_dir='{blocker / 'run'}' is not writable")


def test_a_mesh_the_devices_cannot_hold_fails_before_step_0(tmp_path):
    config = _run_config(tmp_path, "mesh=data=3")
    with pytest.raises(TrainError, match="mesh='data=3'"):
        train(config)
    assert not os.path.exists(tmp_path / "run" / "checkpoints")


# ----------------------------------------------------------------------------------------------- optimizer

def test_weight_decay_spares_norms_biases_a_log_and_dt_bias():
    params = abstract_params(SpB2Config.from_json_file(TINY))  # the mask depends on the paths only
    spared = {jax.tree_util.keystr(p) for p, leaf in jax.tree_util.tree_leaves_with_path(params)
              if not decays(p, leaf)}
    assert spared and all(("norm" in s) or s.endswith(("['A_log']", "['dt_bias']", "['bias']")) for s in spared)
    assert any(s.endswith("['A_log']") for s in spared) and any("norm" in s for s in spared)
    assert not any(s.endswith("['kernel']") for s in spared)


def test_schedule_warms_up_then_decays_to_the_floor():
    c = load_config(None, [f"model.preset={TINY}", "optimizer.lr=1.0", "optimizer.warmup_steps=10",
                           "optimizer.min_lr_ratio=0.1"])
    lr = learning_rate(c.optimizer, 110)
    assert float(lr(0)) == 0.0 and float(lr(5)) == pytest.approx(0.5) and float(lr(10)) == pytest.approx(1.0)
    assert float(lr(110)) == pytest.approx(0.1)


# ----------------------------------------------------------------------------------------------- step

def _state_and_step(config, microbatches, optimizer=None, dtype=jnp.float32, compute=None, **kw):
    opt = load_config(None, [f"model.preset={TINY}", "optimizer.lr=1e-2"]).optimizer
    optimizer = optimizer or make_optimizer(opt, 10)
    params = jax.jit(lambda k: init_params(config, k, param_dtype=dtype))(jax.random.key(0))
    state = TrainState(jnp.zeros((), jnp.int32), params, jax.jit(optimizer.init)(params))
    options = resolve_options(config, dtype=compute or dtype)
    step = jax.jit(make_train_step(config, options, optimizer, learning_rate(opt, 10),
                                   microbatches=microbatches, loss_tile=32, **kw))
    return state, step


def _packed_batch(rows=8, T=48, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, 384, (rows, T)).astype(np.int32)
    seg = np.zeros((rows, T), np.int32)
    for r in range(rows):  # two or three documents and some padding per row
        cuts = sorted(rng.choice(np.arange(5, T - 5), 2, replace=False))
        seg[r, :cuts[0]], seg[r, cuts[0]:cuts[1]] = 1, 2
        seg[r, cuts[1]:T - rng.integers(0, 6)] = 3
    return {"input_ids": jnp.asarray(ids), "segment_ids": jnp.asarray(seg)}


def _accumulation_gap(config, dtype):
    """Metrics of 1 x 8 rows and 4 x 2 rows, and the norm-wise relative gap of their accumulated gradients (an
    optimizer that keeps the gradient it receives as its state: any optimizer's update is a function of it)."""
    keep_gradient = optax.GradientTransformation(lambda p: jax.tree.map(jnp.zeros_like, p),
                                                 lambda g, s, p=None: (jax.tree.map(jnp.zeros_like, g), g))
    batch = _packed_batch()
    (s1, m1), (s4, m4) = (jax.device_get(fn(st, batch)) for st, fn in (
        _state_and_step(config, m, keep_gradient, dtype=dtype) for m in (1, 4)))
    gap = jax.tree.map(lambda a, b: a - b, s1.opt_state, s4.opt_state)
    return m1, m4, float(optax.tree.norm(gap)) / float(optax.tree.norm(s1.opt_state))


def _check_accumulation(m1, m4, rel, tol=1e-6):
    assert abs(m1["loss"] - m4["loss"]) <= tol * abs(m1["loss"]) and m1["tokens"] == m4["tokens"]
    assert abs(m1["grad_norm"] - m4["grad_norm"]) <= tol * m1["grad_norm"]
    assert rel <= tol, rel


def test_four_microbatches_equal_one_batch():
    """Cross-entropy part (``aux_loss_coef = 0``), float64: loss, gradient norm and update (the accumulated
    gradient, norm-wise over all params as the clipping measures it) of 4 microbatches of 2 rows equal those of
    one batch of 8 within 1e-6 (measured ~1e-8: the float32 recurrent states). With the aux loss on (float32), the
    accumulated aux term is the mean of the microbatches' own aux losses (step docstring: a product of batch
    means does not accumulate)."""
    config = SpB2Config.from_dict(_tiny3_dict())  # MoBA, SSE-GDN + SWA, full
    with jax.enable_x64(True):
        _check_accumulation(*_accumulation_gap(config.replace(aux_loss_coef=0.0), jnp.float64))
    state, step4 = _state_and_step(config, 4)
    batch = _packed_batch()
    _, m = jax.device_get(step4(state, batch))
    model = SpB2ForCausalLM(config, resolve_options(config))
    aux_of = jax.jit(lambda p, ids, seg: jnp.sum(model.apply({"params": p}, ids, segment_ids=seg,
                                                             output_logits=False).aux_losses))
    auxes = [float(aux_of(state.params, batch["input_ids"][i:i + 2], batch["segment_ids"][i:i + 2]))
             for i in range(0, 8, 2)]
    assert abs(m["aux_loss"] - np.mean(auxes)) <= 1e-6 * abs(np.mean(auxes))


@pytest.mark.slow
def test_four_microbatches_equal_one_batch_float32():
    """The same in float32: loss and gradient norm within 1e-6. (The update's norm-wise gap measures ~1.3e-6
    here — the backward of 2 rows and of 8 rows sums each weight gradient over the tokens in different orders,
    and cancelling sums amplify float32 rounding — so the update is pinned by the float64 test, not here.)"""
    m1, m4, _ = _accumulation_gap(SpB2Config.from_json_file(TINY).replace(aux_loss_coef=0.0), jnp.float32)
    _check_accumulation(m1, m4, 0.0)


@pytest.mark.slow
def test_bf16_compute_keeps_float32_master_params_and_a_float32_loss():
    """``model.dtype=bfloat16``: params, optimizer state and the step's metrics stay float32 (flax casts each kernel
    at use) and the step changes the params. The loss is the mean CE of bf16 logits accumulated in float32: it
    differs from the float32 step's loss by at most ``2 max|z_bf16 - z_f32|`` (CE is 2-Lipschitz in the logits in
    the max norm), with the logits difference measured on the same batch — a CE summed in bf16 (8 significant
    bits over ~300 targets) would break that."""
    config = SpB2Config.from_json_file(TINY).replace(aux_loss_coef=0.0)
    batch = _packed_batch()
    (s32, step32), (s16, step16) = (_state_and_step(config, 1, dtype=jnp.float32, compute=d)
                                    for d in (jnp.float32, jnp.bfloat16))
    new, m16 = jax.device_get(step16(s16, batch))
    _, m32 = jax.device_get(step32(s32, batch))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves((new.params, new.opt_state)) if x.ndim)
    assert all(np.asarray(v).dtype in (np.float32, np.bool_) for v in m16.values())
    assert any(np.any(a != b) for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(s16.params)))

    def logits(dtype):
        model = SpB2ForCausalLM(config, resolve_options(config, dtype=dtype))
        return np.asarray(model.apply({"params": s32.params}, batch["input_ids"],
                                      segment_ids=batch["segment_ids"]).logits, np.float64)

    gap = np.max(np.abs(logits(jnp.bfloat16) - logits(jnp.float32)))
    assert 0 < abs(m16["loss"] - m32["loss"]) <= 2 * gap + 1e-6, (m16["loss"], m32["loss"], gap)


def test_targets_skip_segment_starts_padding_and_masked_tokens():
    ids = jnp.asarray([[5, 6, 7, 8, 9, 10]])
    seg = jnp.asarray([[1, 1, 2, 2, 2, 0]])
    mask = jnp.asarray([[1, 1, 1, 0, 1, 1]])
    assert targets(ids, seg, mask).tolist() == [[-100, 6, -100, -100, 9, -100]]


def test_a_non_finite_step_changes_nothing_and_reports_it():
    config = SpB2Config.from_json_file(TINY)
    state, step = _state_and_step(config, 1)
    bad = state._replace(params=jax.tree.map(lambda p: p.at[(0,) * p.ndim].set(jnp.nan) if p.ndim == 2 else p,
                                             state.params))
    new, m = step(bad, _packed_batch())
    assert not bool(m["finite"])
    for a, b in zip(jax.tree.leaves((new.params, new.opt_state)), jax.tree.leaves((bad.params, bad.opt_state))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_the_loop_stops_at_a_non_finite_loss_naming_the_step(tmp_path, monkeypatch):
    """The loss of step 5 is made NaN: the run raises naming step 5; the latest checkpoint stays step 4."""
    from spb2_jax.train import loop

    real = loop.make_train_step

    def poisoned(*args, **kwargs):
        step = real(*args, **kwargs)

        def wrapped(state, batch):
            new, m = step(state, batch)
            bad = state.step == 4
            m = dict(m, loss=jnp.where(bad, jnp.nan, m["loss"]), finite=m["finite"] & ~bad)
            return new, m

        return wrapped

    monkeypatch.setattr(loop, "make_train_step", poisoned)
    config = _run_config(tmp_path, "checkpoint_every=1")
    with pytest.raises(NonFiniteLoss, match="step 5: loss=nan"):
        train(config)
    from spb2_jax.train.checkpoints import RunCheckpoints

    assert RunCheckpoints(config.run_dir).latest_step() == 4


# ----------------------------------------------------------------------------------------------- data

def test_packing_leaks_nothing_between_documents(tmp_path):
    """Pre-tokenised documents packed into rows: changing the tokens of one document (same length, so the same
    packing) leaves every other document's per-token loss unchanged (float32: 1e-5 of the largest, the order of
    the chunked sums is the same but XLA may fuse differently), and changes that document's own losses."""
    config = SpB2Config.from_json_file(TINY)
    params = init_params(config, jax.random.key(1))
    model = SpB2ForCausalLM(config, resolve_options(config))
    rng = np.random.default_rng(3)
    docs = [rng.integers(3, 384, n).astype(np.int32) for n in (30, 70, 20, 45, 90, 12, 33)]
    section = DataSection(source="unused", format="npy", seq_len=96, shuffle=False)
    logits_of = jax.jit(lambda ids, seg: model.apply({"params": params}, ids, segment_ids=seg).logits)

    def per_token(documents):
        ds = data_lib.batches(data_lib.grain.MapDataset.source(documents).map(data_lib._with_mask), section,
                              rows=4, seed=0, repeat=False)
        batch = next(iter(ds))
        ids, seg = jnp.asarray(batch["input_ids"]), jnp.asarray(batch["segment_ids"])
        logits = logits_of(ids, seg)
        labels = targets(ids, seg)
        nxt = jnp.concatenate([labels[:, 1:], jnp.full_like(labels[:, :1], -100)], axis=1)
        logp = jax.nn.log_softmax(logits, -1)
        nll = -jnp.take_along_axis(logp, jnp.maximum(nxt, 0)[..., None], -1)[..., 0]
        return np.asarray(jnp.where(nxt >= 0, nll, 0.0)), np.asarray(ids), np.asarray(seg)

    base, ids0, seg0 = per_token(docs)
    changed = list(docs)
    changed[3] = rng.integers(3, 384, len(docs[3])).astype(np.int32)
    new, ids1, seg1 = per_token(changed)
    np.testing.assert_array_equal(seg0, seg1)  # same packing
    touched = np.zeros_like(seg0, bool)
    for r in range(seg0.shape[0]):
        for s in set(seg0[r][seg0[r] > 0]):
            where = seg0[r] == s
            if not np.array_equal(ids0[r][where], ids1[r][where]):
                touched[r] |= where
    assert touched.sum() == len(docs[3])
    assert np.max(np.abs(new - base)[~touched]) <= 1e-5 * np.max(base)
    assert np.max(np.abs(new - base)[touched]) > 0.1


def test_recall_examples_ask_every_key_once_per_round_and_answer_from_the_context():
    """Every masked target is the value its key had in the context; queries go through the keys in rounds (each
    key once per round); the first ``ramp_examples`` grow (example i: p <= ceil(pairs (i + 1) / ramp), q = p),
    the rest are full-length."""
    seen_short = set()
    for index in range(60):
        ex = data_lib.recall_example(index, 7, pairs=16, queries=40, vocab_size=384, symbols=16, ramp_examples=40)
        tokens, mask = ex["tokens"], ex["loss_mask"]
        n_pairs = int(np.argmax(mask)) // 2  # the first answer follows the context and the first query key
        context = dict(zip(tokens[0:2 * n_pairs:2].tolist(), tokens[1:2 * n_pairs:2].tolist()))
        assert len(context) == n_pairs and all(3 <= k < 19 and 19 <= v < 35 for k, v in context.items())
        probe = tokens[2 * n_pairs:]
        assert np.array_equal(np.flatnonzero(mask), 2 * n_pairs + 1 + 2 * np.arange(len(probe) // 2))
        assert all(context[k] == v for k, v in zip(probe[0::2].tolist(), probe[1::2].tolist()))
        asked = probe[0::2].tolist()
        for r in range(0, len(asked), n_pairs):
            assert len(set(asked[r:r + n_pairs])) == len(asked[r:r + n_pairs])
        if index < 40:
            assert 1 <= n_pairs <= -(-16 * (index + 1) // 40) and len(asked) == n_pairs
            seen_short.add(n_pairs)
        else:
            assert n_pairs == 16 and len(asked) == 40
    assert len(seen_short) >= 8  # the ramp covers the range, not one length


def test_data_iterator_resumes_exactly():
    section = DataSection(source="recall", seq_len=80, recall_pairs=8, recall_queries=8)
    docs, _ = data_lib.documents(section, None, 384, seed=0, eos=None)
    it = iter(data_lib.batches(docs, section, rows=2, seed=0))
    for _ in range(3):
        next(it)
    state = it.get_state()
    want = [next(it) for _ in range(3)]
    again = iter(data_lib.batches(docs, section, rows=2, seed=0))
    again.set_state(json.loads(json.dumps(state)))
    for a, b in zip(want, [next(again) for _ in range(3)]):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])


def test_array_record_source_gives_the_batches_of_the_same_npy_documents(tmp_path):
    """The same pre-tokenised documents as ``.npy`` files and as ArrayRecord records (two files) give identical
    batches; a record that is not whole int32 tokens is an error naming the record."""
    rng = np.random.default_rng(5)
    docs = [rng.integers(3, 384, rng.integers(5, 120)).astype(np.int32) for _ in range(12)]
    (tmp_path / "npy").mkdir()
    (tmp_path / "ar").mkdir()
    for i, d in enumerate(docs):
        np.save(tmp_path / "npy" / f"doc{i:02d}.npy", d)
    data_lib.write_array_record(tmp_path / "ar" / "part0.array_record", docs[:7])
    data_lib.write_array_record(tmp_path / "ar" / "part1.array_record", docs[7:])

    def first_batches(source, fmt):
        section = DataSection(source=str(tmp_path / source), format=fmt, extensions=(".npy",), seq_len=48,
                              eval_documents=2)
        train_docs, held = data_lib.documents(section, None, 384, seed=3, eos=None)
        it = iter(data_lib.batches(train_docs, section, rows=3, seed=3))
        return [next(it) for _ in range(4)] + [next(iter(data_lib.batches(held, section, 3, 3, repeat=False)))]

    npy = first_batches("npy", "npy")
    for a, b in zip(npy, first_batches("ar", "arrayrecord")):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    from array_record.python.array_record_module import ArrayRecordWriter

    (tmp_path / "bad").mkdir()
    writer = ArrayRecordWriter(str(tmp_path / "bad" / "x.array_record"), "group_size:1")
    writer.write(b"12345")
    writer.write(b"1234")
    writer.write(b"abcd")
    writer.close()
    section = DataSection(source=str(tmp_path / "bad"), format="arrayrecord", seq_len=8, eval_documents=0,
                          shuffle=False)
    train_docs, _ = data_lib.documents(section, None, 384, seed=0, eos=None)
    with pytest.raises(ValueError, match="5 bytes is not a whole number of int32 tokens"):
        [train_docs[i] for i in range(3)]


# ----------------------------------------------------------------------------------------------- resume

def _losses(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f)}


def test_resume_after_sigkill_is_bitwise(tmp_path):
    """Uninterrupted run (in this process) vs a CLI run SIGKILLed once a checkpoint is complete, as soon as the
    next asynchronous save is in flight (orbax's temporary directory exists) or step 5 is logged, then
    restarted: it resumes from the last complete checkpoint (never the interrupted one) and logs identical
    losses at every step (compared as the logged float64 values)."""
    reference = _run_config(tmp_path / "a")
    train(reference)
    want = _losses(reference.run_dir)
    assert sorted(want) == list(range(1, 9))
    config = _run_config(tmp_path / "b")
    args = [sys.executable, "-m", "spb2_jax.train", f"run_dir={config.run_dir}", f"model.preset={config.model.preset}",
            f"data.source={tmp_path / 'b' / 'docs'}", "data.format=npy", "data.extensions=.npy", "data.seq_len=64",
            "data.batch_size=4", "data.eval_documents=2", "steps=8", "checkpoint_every=2", "log_every=1",
            "optimizer.lr=3e-3", "optimizer.warmup_steps=2"]
    env = dict(os.environ, JAX_PLATFORMS="cpu",  # the same compiler settings as this process's reference run
               JAX_DISABLE_MOST_OPTIMIZATIONS=str(jax.config.values["jax_disable_most_optimizations"]).lower())
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    ckpts = os.path.join(config.run_dir, "checkpoints")
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        names = os.listdir(ckpts) if os.path.isdir(ckpts) else []
        complete = [n for n in names if n.isdigit()]
        in_flight = any("tmp" in n for n in names)
        logged = len(_losses(config.run_dir)) if os.path.exists(os.path.join(config.run_dir, "metrics.jsonl")) else 0
        if complete and (in_flight or logged >= 5):
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    proc.wait(60)
    assert proc.returncode == -signal.SIGKILL, proc.stdout.read().decode()[-2000:]
    done = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resumed from" in done.stdout + done.stderr
    assert _losses(config.run_dir) == want


def test_sigterm_saves_and_exits_cleanly(tmp_path):
    """SIGTERM during a CLI run: the current step finishes, a checkpoint of it is saved (and is the latest), the
    process exits with status 0 saying so."""
    config = _run_config(tmp_path, "steps=200", "checkpoint_every=100")
    args = [sys.executable, "-m", "spb2_jax.train", f"run_dir={config.run_dir}", f"model.preset={config.model.preset}",
            f"data.source={config.data.source}", "data.format=npy", "data.extensions=.npy", "data.seq_len=64",
            "data.batch_size=4", "data.eval_documents=2", "steps=200", "checkpoint_every=100", "log_every=1"]
    proc = subprocess.Popen(args, cwd=REPO, env=dict(os.environ, JAX_PLATFORMS="cpu"), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    metrics = os.path.join(config.run_dir, "metrics.jsonl")
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not (os.path.exists(metrics) and
                                                                    len(_losses(config.run_dir)) >= 2):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-2000:]
    from spb2_jax.train.checkpoints import RunCheckpoints

    last = max(_losses(config.run_dir))
    assert 2 <= last < 200 and f"SIGTERM: saved step {last} and stopped" in out
    assert RunCheckpoints(config.run_dir).latest_step() == last


# ----------------------------------------------------------------------------------------------- sharded

def _tiny3(tmp_path) -> str:
    """``_tiny3_dict()`` written as a preset file."""
    path = tmp_path / "tiny3.json"
    path.write_text(json.dumps(_tiny3_dict()))
    return str(path)


def _sharded_losses(tmp_path, steps, *specs):
    config = _run_config(tmp_path)  # writes the documents
    proc = subprocess.run([sys.executable, "-m", "tests.train_worker", str(tmp_path / "runs"),
                           config.data.source, str(steps), *specs, "--", f"model.preset={config.model.preset}"],
                          cwd=REPO, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _check_sharded(losses, steps):
    one = losses.pop("")
    assert len(one) == steps
    for spec, got in losses.items():
        assert len(got) == steps, spec
        assert np.max(np.abs(np.subtract(got, one))) <= 1e-5 * max(map(abs, one)), (spec, got, one)


def test_sharded_training_equals_one_device(tmp_path):
    """8 forced CPU devices, meshes ``fsdp=2,sequence=2,data=2`` and ``fsdp=8`` (params and optimizer state
    sharded by the rules, batch over data x fsdp, time over sequence with the sequence-parallel mixers): the
    losses of 20 steps of the 3-layer tiny hybrid (MoBA, SSE-GDN + SWA, full) equal the 1-device run's within
    1e-5 (float32; measured: 4.8e-7 for both meshes; 3.2e-7 with the 6-layer configs/tiny.json).

    The run uses AdamW with lr 1e-3 and ``eps=1e-3``: two amplifiers of float32 reassociation noise that belong to
    the optimisation, not to the sharding, were measured with the same 20 steps (largest gap of the two meshes):
    with ``eps=1e-8`` Adam divides every gradient entry by its own magnitude, so entries near zero (the SSE
    router's gradient is ill-conditioned in float32) whose noise flips their sign become updates of size lr in
    opposite directions (gap 1.3e-5 at step 7, 1e-3 at step 20; configs/tiny.json); with lr 3e-3 the trajectory
    itself is unstable from step 8 on — gaps grow about 3x per step, identically for both meshes (3.6e-6 at step
    9, 6.2e-4 at step 20), as two 1-device runs from points 1e-7 apart would."""
    _check_sharded(_sharded_losses(tmp_path, 20, "fsdp=2,sequence=2,data=2", "fsdp=8"), 20)


# ----------------------------------------------------------------------------------------------- init / export

def _first_batch_loss(config, params) -> float:
    """The loss of the run's first batch under ``params``, computed here without the loop (``loss_parts`` on the
    batch that ``data.batches`` yields first): the loss a run logs at step 1 when it starts from ``params``."""
    from spb2_jax.train.step import loss_parts

    model_config = SpB2Config.from_json_file(config.model.preset)
    train_docs, _ = data_lib.documents(config.data, None, model_config.vocab_size, config.seed, None)
    batch = next(iter(data_lib.batches(train_docs, config.data, config.data.batch_size, config.seed)))
    model = SpB2ForCausalLM(model_config, resolve_options(model_config))
    nll, count, aux = loss_parts(model, params, {k: jnp.asarray(v) for k, v in batch.items()}, None, 512)
    return float(nll / count + model_config.aux_loss_coef * aux)


@pytest.mark.slow
def test_export_hf_then_init_from_it_or_from_the_run(tmp_path):
    """``--export-hf`` writes an HF checkpoint holding the final params (``load_pretrained`` gives their logits);
    ``--init-from`` the export or the run directory starts a new run from those params (its step-1 loss is the
    first batch's loss under them, computed independently), a model that differs is refused before step 0, and
    an export directory that already holds a checkpoint is refused before training."""
    import spb2_jax

    first = _run_config(tmp_path / "a", "steps=2")
    export = tmp_path / "export"
    result = train(first, export_hf=str(export))
    trained = jax.device_get(result.state.params)
    exported = spb2_jax.load_pretrained(export)
    for a, b in zip(jax.tree.leaves(exported.params), jax.tree.leaves(trained), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # the very params, bit for bit
    ids = jnp.asarray([[5, 9, 200, 17, 3, 44]])
    want = np.asarray(SpB2ForCausalLM(exported.config, resolve_options(exported.config)).apply(
        {"params": trained}, ids).logits)
    # the handle jits the forward, the reference runs op by op: float32 reassociation only
    np.testing.assert_allclose(np.asarray(exported(ids).logits), want, rtol=0, atol=1e-5 * np.abs(want).max())
    assert not (export / "tokenizer.json").exists()  # pre-tokenised documents: no tokenizer to export

    expected = _first_batch_loss(first, trained)
    for name, source in (("b", export), ("c", first.run_dir)):
        config = _run_config(tmp_path / name, "steps=1", f"model.init_from={source}")
        assert _losses(train(config).run_dir)[1] == pytest.approx(expected, rel=1e-6), name
    assert abs(_losses(first.run_dir)[1] - expected) > 1e-3  # the random init's loss differs

    other = _tiny3_dict() | {"intermediate_size": 96}
    (tmp_path / "other.json").write_text(json.dumps(other))
    with pytest.raises(TrainError, match="its params do not fit the model being trained"):
        train(_run_config(tmp_path / "d", "steps=1", f"model.preset={tmp_path / 'other.json'}",
                          f"model.init_from={export}"))
    with pytest.raises(TrainError, match="already holds a checkpoint"):
        train(_run_config(tmp_path / "e", "steps=1"), export_hf=str(export))
    assert not os.path.exists(tmp_path / "e" / "run" / "checkpoints")


# ----------------------------------------------------------------------------------------------- multi-host

@pytest.mark.slow
def test_two_process_cli_run_trains_on_the_global_batch_and_resumes(tmp_path):
    """Two CLI processes (one CPU device each) joined by ``--coordinator`` on localhost train over ``mesh=data=2``:
    each reads its own half of the documents (``process_index::2``) and the step-1 loss both log is the loss of
    the global batch (process 0's rows then process 1's) under the initial params, computed here in one process;
    only process 0 writes ``metrics.jsonl``. Launched again with more steps, both resume from the shared
    checkpoint and log only the new steps."""
    config = _run_config(tmp_path, "steps=2", "mesh=data=2")
    base = [f"run_dir={config.run_dir}", f"model.preset={config.model.preset}", f"data.source={config.data.source}",
            "data.format=npy", "data.extensions=.npy", "data.seq_len=64", "data.batch_size=4",
            "data.eval_documents=2", "checkpoint_every=2", "log_every=1", "mesh=data=2"]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | {"JAX_PLATFORMS": "cpu"}

    def launch(steps):
        port = free_port()
        procs = [subprocess.Popen([sys.executable, "-m", "spb2_jax.train", "--coordinator", f"localhost:{port}",
                                   "--num-processes", "2", "--process-id", str(i), *base, f"steps={steps}"],
                                  cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for i in range(2)]
        outs = [p.communicate(timeout=600)[0] for p in procs]
        assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-2000:] for o in outs)
        return outs

    outs = launch(2)
    logged = _losses(config.run_dir)
    assert sorted(logged) == [1, 2]
    done = f"done: step 2 loss {logged[2]:.4f}"
    assert all(done in o for o in outs), (done, [o[-600:] for o in outs])  # both processes saw the same loss

    model_config = SpB2Config.from_json_file(config.model.preset)
    params = init_params(model_config, jax.random.key(config.seed))
    train_docs, _ = data_lib.documents(config.data, None, model_config.vocab_size, config.seed, None)
    rows = [next(iter(data_lib.batches(train_docs, config.data, 2, config.seed, process_index=i, process_count=2)))
            for i in range(2)]
    batch = {k: jnp.asarray(np.concatenate([r[k] for r in rows])) for k in rows[0]}
    from spb2_jax.train.step import loss_parts

    model = SpB2ForCausalLM(model_config, resolve_options(model_config))
    nll, count, aux = loss_parts(model, params, batch, None, 512)
    assert logged[1] == pytest.approx(float(nll / count + model_config.aux_loss_coef * aux), rel=1e-5)

    outs = launch(3)
    assert "resumed from" in outs[0] and all("done: step 3" in o for o in outs), [o[-600:] for o in outs]
    assert sorted(_losses(config.run_dir)) == [1, 2, 3]


def test_chat_documents_learn_only_the_assistant_turns(tmp_path):
    """``format: chat``: ChatML text, and the loss mask covers exactly each assistant content + ``<|im_end|>``."""
    convs = [[{"role": "system", "content": f"be brief {i}"}, {"role": "user", "content": f"what is {i}?"},
              {"role": "assistant", "content": f"it is {i}"}, {"role": "user", "content": "and?"},
              {"role": "assistant", "content": "done"}] for i in range(5)]
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in convs))
    section = DataSection(source=str(path), format="chat", field="messages", eval_documents=1)
    tokenizer = data_lib.load_tokenizer(section)
    train_docs, held = data_lib.documents(section, tokenizer, 384, seed=0, eos=2)
    for doc in [held[0]] + [train_docs[i] for i in range(len(train_docs))]:
        text = tokenizer.decode(doc["tokens"].tolist(), skip_special_tokens=False)
        assert text.startswith("<|im_start|>system\nbe brief") and text.count("<|im_end|>") == 5
        learned = tokenizer.decode(doc["tokens"][doc["loss_mask"] == 1].tolist(), skip_special_tokens=False)
        number = text.split("what is ")[1].split("?")[0]
        assert learned == f"it is {number}<|im_end|>done<|im_end|>"
    path.write_text(json.dumps({"messages": [{"role": "user"}]}) + "\n")
    with pytest.raises(ValueError, match="message 0 must be"):
        data_lib.documents(section, tokenizer, 384, seed=0, eos=2)
