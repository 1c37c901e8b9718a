"""``python -m spb2_jax.eval``: ppl sharded = one device, recall / passkey / niah / speed end to end with real PNGs
and ``results.json``, the recall metric against an independent count, the memory model against XLA's accounting,
and one clear message for each bad input."""

from __future__ import annotations

import json
import os
import re
import runpy
import subprocess
import sys

import jax
import matplotlib
import numpy as np
import pytest

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from spb2_jax.api import Model, load_pretrained  # noqa: E402
from spb2_jax.checkpoint.hf import save_hf  # noqa: E402
from spb2_jax.config import SpB2Config  # noqa: E402
from spb2_jax.eval import (EvalError, full_attention_twin, perplexity, predict_memory, recall_accuracy,  # noqa: E402
                           retrieval_grid, speed_curves, sse_swa_twin)
from spb2_jax.eval import speed as speed_module  # noqa: E402
from spb2_jax.eval.__main__ import main  # noqa: E402
from spb2_jax.eval.recall import recall_batch  # noqa: E402
from spb2_jax.eval.retrieval import pairs_prompt, text_prompt  # noqa: E402
from spb2_jax.eval.memory import static_memory  # noqa: E402
from spb2_jax.eval.speed import compiled_peak_bytes, random_params  # noqa: E402
from spb2_jax.generate.decode import extend_in_place  # noqa: E402
from spb2_jax.layers.cache import init_cache  # noqa: E402
from spb2_jax.model import init_params  # noqa: E402
from spb2_jax.options import resolve_options  # noqa: E402
from tests.helpers import REPO  # noqa: E402

pytestmark = pytest.mark.usefixtures("fast_compiles")  # many small programs: compile time dominates

TEXT = REPO / "spb2_jax" / "train" / "data.py"  # ~12k tokens of held-out Python source for the tiny tokenizer
RECALL = REPO / "configs" / "tiny-recall.json"


def _png_is_real(path, min_width=500, min_height=300):
    image = plt.imread(path)  # a real picture: its size, and more than one colour in it
    assert image.shape[1] >= min_width and image.shape[0] >= min_height, (path, image.shape)
    assert image[..., :3].std() > 0.05, path


def _results(out) -> dict:
    res = json.loads((out / "results.json").read_text())
    for key in ("command", "args", "config", "commit", "device", "mesh", "created"):
        assert key in res, key
    assert res["device"]["backend"] == jax.default_backend()
    return res


def _env(devices: int) -> dict:
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}".strip()
    return dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")


def _cli(*args: str, devices: int = 1) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "spb2_jax.eval", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=600, env=_env(devices))


def test_ppl_on_four_sequence_shards_equals_one_device(tmp_path):
    """The acceptance check: ``ppl`` of the shipped tiny checkpoint (windows of 256 tokens) with sequence=4 on 4
    forced CPU devices vs one device, through the CLI. (Greedy decoding after a sequence-sharded prefill, which
    ``passkey`` / ``niah`` use through ``Model.generate``, is checked in ``test_sequence_parallel``.)"""
    args = ["ppl", "--text", str(TEXT), "--context", "256", "--max-windows", "6", "--no-progress", "--out"]
    assert main([*args, str(tmp_path / "one")]) == 0  # this process: one device
    proc = _cli(*args, str(tmp_path / "four"), "--mesh", "sequence=4", devices=4)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = {name: _results(tmp_path / name) for name in ("one", "four")}
    one, four = res["one"], res["four"]
    assert four["mesh"] == {"data": 1, "fsdp": 1, "tensor": 1, "sequence": 4} and one["mesh"] is None
    assert four["device"]["count"] == 4 and one["windows"] == four["windows"] == 6
    assert abs(four["ppl"] / one["ppl"] - 1) <= 1e-5, (one["ppl"], four["ppl"])
    np.testing.assert_allclose(four["curve"]["nll"], one["curve"]["nll"], rtol=1e-5)
    _png_is_real(tmp_path / "one" / "loss_vs_position.png")


def test_ppl_equals_exp_of_the_mean_token_loss_from_full_logits():
    """Independent count: the logits of each window from the plain forward, log-softmax in float64."""
    model = load_pretrained()
    ids = np.asarray(model.encode(TEXT.read_text()))[:3 * 64 + 5]
    res = perplexity(model, ids, 64, progress=False)
    nll = []
    for w in range(3):
        window = ids[w * 64:(w + 1) * 64]
        logits = np.asarray(model(window[None]).logits, np.float64)[0]
        logp = logits - logits.max(-1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
        nll.append(-logp[np.arange(63), window[1:]])
    nll = np.stack(nll)
    assert res["windows"] == 3 and res["tokens"] == 3 * 63
    assert res["ppl"] == pytest.approx(float(np.exp(nll.mean())), rel=1e-5)
    c = res["curve"]
    assert c["position_lo"][0] == 1 and c["position_hi"][-1] == 64
    for lo, hi, v in zip(c["position_lo"], c["position_hi"], c["nll"]):
        assert v == pytest.approx(float(nll[:, lo - 1:hi - 1].mean()), rel=1e-5)


@pytest.fixture(scope="module")
def recall_checkpoint(tmp_path_factory):
    """A random-init tiny-recall checkpoint (the trained one is a benchmark: BENCHMARKS.md)."""
    config = SpB2Config.from_json_file(str(RECALL))
    path = tmp_path_factory.mktemp("recall") / "ckpt"
    save_hf(config, random_params(config, seed=3), path, progress=False)  # N(0, 0.02^2): no init compile
    return path


@pytest.mark.slow(reason="the metric against an independent count (default: the recall CLI's table)")
def test_recall_accuracy_is_the_share_of_answers_the_logits_pick():
    """``recall_accuracy`` vs an independent count from the model's full logits (argmax over the value ids)."""
    config = SpB2Config.from_json_file(str(RECALL))
    params = init_params(config, jax.random.key(5))
    options = resolve_options(config)
    tokens, mask = recall_batch(40, 4, 4, 16, config.vocab_size)
    assert tokens.shape == (4, 40) and mask.sum() == 4 * 16  # 4 pairs, 16 queries answered each
    res = recall_accuracy(config, options, params, 40, 4, examples=4, symbols=16, batch_size=4)
    model = Model(config=config, options=options, params=params)
    logits = np.asarray(model(tokens).logits)
    pick = logits[:, :-1, 19:35].argmax(-1) + 19
    target = mask[:, 1:].astype(bool)
    assert res["answers"] == target.sum()
    assert res["accuracy"] == pytest.approx(float((pick == tokens[:, 1:])[target].mean()))
    assert res["accuracy_any"] == pytest.approx(float((logits[:, :-1].argmax(-1) == tokens[:, 1:])[target].mean()))


def test_recall_cli_writes_the_table_with_the_random_baseline_and_chance(tmp_path, recall_checkpoint, capsys):
    out = tmp_path / "recall"
    assert main(["recall", "--checkpoint", str(recall_checkpoint), "--lengths", "40,80", "--pairs", "4,8",
                 "--examples", "8", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    res = _results(out)
    assert res["chance"] == 1 / 16
    names = {r["model"] for r in res["rows"]}
    assert names == {"model", "random init"} and len(res["rows"]) == 8
    for r in res["rows"]:  # random weights do not retrieve: both near chance (8 x >= 16 answers per cell)
        assert abs(r["accuracy"] - 1 / 16) < 0.12, r
    assert "random init" in printed and "chance" in printed
    _png_is_real(out / "recall_vs_length.png")


def test_pairs_prompt_puts_one_needle_at_its_depth_and_asks_its_key():
    rng = np.random.default_rng(0)
    for task in ("passkey", "niah"):
        for length, depth in ((65, 0.0), (65, 1.0), (128, 0.5), (3, 0.5)):
            ids, answer = pairs_prompt(task, length, depth, rng, 16)
            assert len(ids) == length - (length % 2 == 0)
            key = ids[-1]
            assert 3 <= key < 19 and 19 <= answer < 35
            keys = ids[0:-1:2]
            assert keys.count(key) == 1  # the needle key appears once, then as the question
            at = 2 * keys.index(key)
            assert ids[at + 1] == answer
            n = (length - 3) // 2
            assert at == 2 * round(depth * n)


def test_text_prompt_has_the_length_and_the_needle():
    model = load_pretrained()
    hay = model.encode(TEXT.read_text())
    for depth in (0.0, 0.5, 1.0):
        ids = text_prompt(model.tokenizer, "passkey", 200, depth, "71432", hay)
        assert len(ids) == 200
        text = model.decode(ids)
        assert "71432" in text and text.rstrip().endswith("The pass key is")
    with pytest.raises(EvalError, match="cannot hold the needle"):
        text_prompt(model.tokenizer, "niah", 10, 0.5, "71432", hay)


@pytest.mark.parametrize("task, extra", [
    ("passkey", []),
    pytest.param("niah", ["--haystack", str(TEXT)], marks=pytest.mark.slow(reason="the same heatmap code as passkey"))])
def test_retrieval_cli_writes_a_heatmap(tmp_path, task, extra):
    out = tmp_path / task
    assert main([task, "--lengths", "128", "--depths", "0,1", "--trials", "2", "--out", str(out), "--no-progress",
                 *extra]) == 0
    res = _results(out)
    assert res["format"] == "text" and np.asarray(res["accuracy"]).shape == (2, 1)
    assert len(res["examples"]) == 2
    _png_is_real(out / f"{task}_heatmap.png", min_width=400)


@pytest.mark.slow(reason="pairs prompts end to end (default: test_pairs_prompt...; BENCHMARKS runs them on tiny-recall)")
def test_passkey_in_the_pairs_format_on_a_tokenizer_less_checkpoint(tmp_path, recall_checkpoint):
    model = load_pretrained(str(recall_checkpoint))
    assert model.tokenizer is None
    res = retrieval_grid(model, "passkey", [33, 64], [0.0, 1.0], trials=2, progress=False)
    assert res["format"] == "pairs" and np.asarray(res["accuracy"]).shape == (2, 2)


def test_speed_cli_curves_plots_and_memory_prediction(tmp_path, capsys):
    """A 2-layer SSE config (one layer kind to calibrate), two contexts, 2 decode steps. (The side-by-side
    variants: ``test_a_curve_stops_cleanly_at_the_first_out_of_memory``; the twins: ``test_twins_...``.)"""
    tiny = SpB2Config.from_json_file(str(REPO / "configs" / "tiny.json"))
    config = tmp_path / "two-layer.json"
    config.write_text(tiny.replace(num_hidden_layers=2, attn={"layers": (), "full_layers": ()}).to_json_string())
    out = tmp_path / "speed"
    assert main(["speed", "--config", str(config), "--lengths", "32,64", "--decode-steps", "2",
                 "--out", str(out), "--no-progress"]) == 0
    res = _results(out)
    assert set(res["curves"]) == {"model"}
    for v, c in res["curves"].items():
        assert [p["T"] for p in c["points"]] == [32, 64] and c["stopped"] is None
        for p in c["points"]:
            assert p["ttft_s"] > 0 and p["decode_tok_s"] > 0 and p["peak_bytes"] > 0 and p["predicted_bytes"] > 0
        assert res["summary"][v]["ttft_exponent"] is not None
    for name in ("ttft.png", "memory.png", "decode.png"):
        _png_is_real(out / name)
    tool = runpy.run_path(str(REPO / "tools" / "memory_model.py"))  # tools/memory_model.py --check on this run
    assert tool["main"](["--check", str(out / "results.json")]) == 0
    assert "largest error" in capsys.readouterr().out
    assert tool["main"](["--check", str(tmp_path / "missing.json")]) == 2


def test_a_curve_stops_cleanly_at_the_first_out_of_memory(monkeypatch):
    """The curve logic with a stand-in measurement: the full twin runs out of memory at T = 128."""
    def measure(config, options, params, T, **kw):
        if T >= 128 and config.layer_kinds[0] == "full":
            raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 12345 bytes.")
        if T >= 256:
            raise ValueError("a bug, not a memory error")
        return {"T": T, "ttft_s": 1.0}

    monkeypatch.setattr(speed_module, "measure_point", measure)
    config = SpB2Config.from_json_file(str(REPO / "configs" / "tiny.json"))
    curves = speed_curves(config, ["model", "full"], [32, 64, 128], decode_steps=0, progress=False)
    assert [p["T"] for p in curves["model"]["points"]] == [32, 64, 128] and curves["model"]["stopped"] is None
    assert [p["T"] for p in curves["full"]["points"]] == [32, 64]
    assert curves["full"]["stopped"].startswith("out of memory at T=128: RESOURCE_EXHAUSTED")
    with pytest.raises(ValueError, match="a bug"):  # anything but out-of-memory is raised
        speed_curves(config, ["model"], [256], decode_steps=0, progress=False)


def test_twins_keep_the_sizes_and_change_only_the_layer_kinds():
    config = SpB2Config.from_json_file(str(REPO / "configs" / "small-8l.json"))
    full, lin = full_attention_twin(config), sse_swa_twin(config)
    assert set(full.layer_kinds) == {"full"} and set(lin.layer_kinds) == {"sse_gdn"}
    for twin in (full, lin):
        assert (twin.hidden_size, twin.num_hidden_layers, twin.vocab_size, twin.num_heads) == \
            (config.hidden_size, config.num_hidden_layers, config.vocab_size, config.num_heads)


def test_memory_model_params_and_cache_are_their_arrays_bytes():
    """Params and cache from shapes equal the real arrays' bytes, the cache's K/V split over ``sequence``. (How far
    the activations' linear extrapolation in T holds is a benchmark: BENCHMARKS.md, small-8l from 4k to 64k within
    11 %.)"""
    base = SpB2Config.from_json_file(str(REPO / "configs" / "tiny.json"))
    T = 128
    part = static_memory(base, T, extra_slots=8)
    nbytes = lambda tree: sum(x.nbytes for x in jax.tree.leaves(tree))  # noqa: E731
    assert part["params"] == nbytes(init_params(base, jax.random.key(0)))
    assert part["cache"] == nbytes(init_cache(base, 1, T + 8))
    split = static_memory(base, T, extra_slots=8, mesh={"sequence": 2})
    kv = 2 * 3 * base.attn.kv_heads * (T + 8) * base.head_dim * 4  # the 3 MoBA / full layers' K and V
    assert split["cache"] == part["cache"] - kv // 2


@pytest.mark.slow(reason="5 compiles (default: the params / cache parts and the speed CLI's predictions)")
def test_memory_model_at_its_calibration_point_is_xla_s_accounting():
    """A homogeneous 4-layer MoBA stack at a calibration context: the prediction is XLA's accounting of the
    compiled prefill (``W + 3 R = temp_4``), so the parts add up to the measured program."""
    base = SpB2Config.from_json_file(str(REPO / "configs" / "tiny.json"))
    T = 128
    every = tuple(range(4))
    stack = base.replace(num_hidden_layers=4, attn={"layers": every, "full_layers": ()})  # 4 MoBA layers
    options = resolve_options(stack)
    compiled = extend_in_place.lower(
        init_params(stack, jax.random.key(0)), jax.ShapeDtypeStruct((1, T), np.int32),
        jax.ShapeDtypeStruct((1, T), np.bool_), jax.eval_shape(lambda: init_cache(stack, 1, T, options.dtype)),
        config=stack, fresh=True, all_logits=False, options=options).compile()
    pred = predict_memory(stack, T, calibration=(64, T))
    assert pred["total"] == sum(v for k, v in pred.items() if k != "total")
    assert abs(pred["total"] / compiled_peak_bytes(compiled) - 1) < 1e-3, (pred, compiled_peak_bytes(compiled))


@pytest.mark.parametrize("args, match", [
    (["ppl", "--text", str(TEXT), "--context", "100000"], r"--context 100000 is longer than the text \(\d+ tokens\)"),
    (["ppl", "--text", str(TEXT), "--context", "255", "--mesh", "sequence=4"],
     "--context 255 is not divisible by the mesh's sequence=4 shards"),
    (["ppl", "--text", "/nonexistent.txt"], "--text '/nonexistent.txt': no such file"),
    (["ppl", "--text", str(TEXT), "--mesh", "sequence=4"], "--mesh 'sequence=4' needs 4 devices, this process has 1"),
    (["ppl", "--text", str(TEXT), "--mesh", "pipe=2"], "unknown mesh axis 'pipe'"),
    (["ppl", "--text", str(TEXT), "--checkpoint", "/nonexistent"], "no such directory"),
    (["passkey", "--depths", "0,1.5"], r"--depths \[0.0, 1.5\] must lie in \[0, 1\]"),
    (["recall", "--pairs", "32"], "--pairs 32 needs that many distinct keys"),
    (["speed", "--config", "/nonexistent.json"], "no such file"),
])
def test_bad_inputs_print_one_error_line(tmp_path, capsys, args, match):
    assert main([*args, "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert re.search(match, err[0]), err[0]


def test_an_unknown_subcommand_is_one_error_line():
    proc = _cli("perplexity", "--text", str(TEXT))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: argument SUBCOMMAND: invalid choice: 'perplexity'"), lines
