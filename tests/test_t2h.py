"""Transformer-to-Hybrid conversion (``spb2_jax.t2h``): the HF Qwen3 fixture teacher -> a tiny hybrid student.

Checked on the written safetensors against the teacher's own file (independent of our Flax layouts): copied tensors
bit-identical, repeated SSE k/v heads in HF ``repeat_kv`` order (numpy ``np.repeat`` over kv heads), the new
low-rank second factors zero; the SWA branch of every SSE layer, fed the teacher's input of that layer, reproduces
the teacher's attention output (window >= T), and fails to with the kv heads swapped.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

import spb2_jax
from spb2_jax.checkpoint import load_qwen3
from spb2_jax.config import SpB2Config
from spb2_jax.layers.block import DecoderBlock
from spb2_jax.model import SpB2ForCausalLM, build_segments
from spb2_jax.t2h import COPIED, NEW, REPEATED, convert
from spb2_jax.t2h.__main__ import main as t2h_main
from tests.helpers import REPO, qwen3_fixture_dir

ATOL = 1e-4  # float32 attention of O(1)-scale weights; the same ops in the same order give ~1e-6


def student_config(kind: str = "gdn", window: int = 64) -> dict:
    """configs/tiny.json cut to the fixture teacher's 4 layers: MoBA, SSE, SSE, full; rope theta 5e6 (a change
    the table must state, as in the official presets)."""
    d = json.loads((REPO / "configs" / "tiny.json").read_text())
    d.update(num_hidden_layers=4, linear_attn_type=kind, max_position_embeddings=256)
    d["attn"] = dict(d["attn"], layers=[0, 3], full_layers=[3], window_size=window, rope_theta=5e6)
    return d


def _convert(tmp_path, kind="gdn", window=64):
    path = tmp_path / f"student-{kind}.json"
    path.write_text(json.dumps(student_config(kind, window)))
    out = tmp_path / f"hybrid-{kind}"
    assert t2h_main(["--qwen3", str(qwen3_fixture_dir()), "--config", str(path), "--out", str(out)]) == 0
    return path, out


@pytest.mark.parametrize("kind", ["gdn", "gla"])
def test_conversion_copies_repeats_and_initialises_as_the_table_says(tmp_path, kind):
    _, out = _convert(tmp_path, kind)
    teacher = load_file(qwen3_fixture_dir() / "model.safetensors")
    student = load_file(out / "model.safetensors")
    table = json.loads((out / "t2h_conversion.json").read_text())
    rows = {r["name"]: r for r in table["tensors"]}
    assert set(rows) == set(student)
    group, H = 2, 32  # the fixture: 4 query heads, 2 kv heads, head dim 32
    for name, r in rows.items():
        if r["how"] == COPIED:
            assert student[name].dtype == teacher[r["source"]].dtype
            assert np.array_equal(student[name], teacher[r["source"]]), name
        elif r["how"] == REPEATED:
            src = teacher[r["source"]]  # HF [K*H, D]
            want = np.repeat(src.reshape(-1, H, src.shape[-1]), group, axis=0).reshape(-1, src.shape[-1])
            assert np.array_equal(student[name], want), name
        else:
            assert r["how"] == NEW and r["source"] is None
    sse = [1, 2]
    for i in sse:
        for t in ("q", "k"):
            assert rows[f"model.layers.{i}.attn.lora_{t}_proj.1.weight"]["how"] == NEW
            assert not student[f"model.layers.{i}.attn.lora_{t}_proj.1.weight"].any()
            assert student[f"model.layers.{i}.attn.lora_{t}_proj.0.weight"].std() > 0
        assert rows[f"model.layers.{i}.attn.sse_k_proj.weight"]["source"] == f"model.layers.{i}.self_attn.k_proj.weight"
        assert rows[f"model.layers.{i}.attn.sse_v_proj.weight"]["how"] == REPEATED
        assert rows[f"model.layers.{i}.attn.swa_q_norm.weight"]["source"] == f"model.layers.{i}.self_attn.q_norm.weight"
    assert rows["model.embeddings.weight"]["source"] == "model.embed_tokens.weight"
    assert rows["model.layers.3.attn_norm.weight"]["source"] == "model.layers.3.input_layernorm.weight"
    assert table["config_changes"] == [{"field": "attn.rope_theta", "teacher": 1e6, "student": 5e6}]
    text = (out / "t2h_conversion.txt").read_text()
    assert "attn.rope_theta 1000000.0 -> 5000000.0" in text and "repeated: 4 tensors" in text
    model = spb2_jax.load_pretrained(out)  # loads with the library's loader
    assert model.config.layer_kinds == ("moba", f"sse_{kind}", f"sse_{kind}", "full")
    assert np.isfinite(np.asarray(model(np.load(qwen3_fixture_dir() / "inputs.npz")["input_ids"]).logits)).all()


def _swa_vs_teacher(student_cfg: SpB2Config, student_params, swap_kv: bool = False) -> float:
    """Largest |SWA branch - teacher attention output| over the SSE layers, each fed the teacher's own input."""
    tcfg, tparams = load_qwen3(qwen3_fixture_dir(), progress=False)
    ids = jnp.asarray(np.load(qwen3_fixture_dir() / "inputs.npz")["input_ids"])
    tout = SpB2ForCausalLM(tcfg).apply({"params": tparams}, ids, None, output_hidden_states=True,
                                       output_mixer_outputs=True)
    segments = build_segments(ids, None, None)
    worst = 0.0
    for i in (1, 2):
        p = jax.tree_util.tree_map(lambda a: a, student_params["model"][f"layers_{i}"])
        if swap_kv:  # the kv heads of the SWA k projection in the wrong order
            k = p["attn"]["swa_k_proj"]["kernel"]
            p["attn"]["swa_k_proj"]["kernel"] = jnp.concatenate([k[:, 32:], k[:, :32]], axis=1)
        _, state = DecoderBlock(student_cfg, i).apply({"params": p}, tout.hidden_states[i], segments,
                                                      mutable=["intermediates"])
        swa = state["intermediates"]["attn"]["swa_output"][0]
        worst = max(worst, float(jnp.abs(swa - tout.mixer_outputs[i]).max()))
    return worst


def test_swa_branch_reproduces_the_teachers_attention_and_would_catch_a_wrong_head_order():
    tcfg, tparams = load_qwen3(qwen3_fixture_dir(), progress=False)
    d = student_config(window=64)  # >= T = 40: the window sees everything the teacher's attention sees
    d["attn"]["rope_theta"] = 1e6  # the teacher's positions, so the branch is the same function
    cfg = SpB2Config.from_dict(d)
    params, _ = convert(tcfg, tparams, cfg)
    assert _swa_vs_teacher(cfg, params) <= ATOL
    assert _swa_vs_teacher(cfg, params, swap_kv=True) > 100 * ATOL


def test_t2h_cli_errors_are_one_line(tmp_path, capsys):
    d = student_config()
    d["hidden_size"] = 128
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(d))
    assert t2h_main(["--qwen3", str(qwen3_fixture_dir()), "--config", str(bad), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: student hidden_size=128 differs from the teacher's 64"]
    assert t2h_main(["--qwen3", str(qwen3_fixture_dir()), "--config", "no-such-preset",
                     "--out", str(tmp_path / "o")]) == 2
    assert "no such file and no such preset" in capsys.readouterr().err
    path, out = _convert(tmp_path)
    assert t2h_main(["--qwen3", str(qwen3_fixture_dir()), "--config", str(path), "--out", str(out)]) == 2
    assert "already holds a checkpoint" in capsys.readouterr().err


STAGES = [  # (preset, MoBA chunk / top-k, sequence shards, teacher?) as the paper's pipeline (issue T2H)
    ("t2h-align", None, 1, True), ("t2h-kd-8k", (512, 4), 1, True), ("t2h-ext-64k", (1024, 8), 4, False),
    ("t2h-ext-256k", (4096, 12), 8, False), ("t2h-ext-512k", (4096, 12), 8, False), ("t2h-sft", (4096, 12), 1, True),
]


def test_stage_presets_chain_and_set_the_papers_moba_and_lengths():
    from spb2_jax.parallel.mesh import parse_mesh_spec
    from spb2_jax.train import load_config

    previous = None
    for name, moba, seq_shards, teacher in STAGES:
        cfg = load_config(REPO / "configs" / "train" / f"{name}.yaml")
        if moba is not None:
            model = SpB2Config.from_json_file(REPO / cfg.model.preset)
            assert (model.attn.moba_chunk_size, model.attn.moba_topk) == moba, name
            assert cfg.model.init_from == previous, name  # each stage starts from the previous one's params
        else:
            assert cfg.model.checkpoint == "runs/t2h/converted" and cfg.distill.train_only_new
        assert parse_mesh_spec(cfg.mesh)["sequence"] == seq_shards, name
        assert cfg.data.seq_len % seq_shards == 0
        assert (cfg.distill.teacher is not None) == teacher, name
        previous = cfg.run_dir
    assert load_config(REPO / "configs" / "train" / "t2h-ext-512k.yaml").data.seq_len == 524288
    assert load_config(REPO / "configs" / "train" / "t2h-sft.yaml").data.format == "chat"
