"""``python -m spb2_jax.spiking_report`` on the embedded tiny checkpoint: table, JSON, PNGs, the k sweep, errors."""

from __future__ import annotations

import json

import matplotlib
import pytest

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from spb2_jax.spiking_report import main
from tests.helpers import REPO

TEXT = REPO / "spb2_jax" / "train" / "data.py"  # held-out Python source


def test_report_writes_its_table_plots_and_sweep(tmp_path, capsys):
    out = tmp_path / "rep"
    assert main(["--text", str(TEXT), "--max-tokens", "96", "--out", str(out), "--sweep", "3,4"]) == 0
    printed = capsys.readouterr().out
    assert "overall (66 layers, 96 tokens, k = 3.0)" in printed and "energy (45 nm" in printed
    report = json.loads((out / "report.json").read_text())
    o = report["overall"]
    assert 0 < o["bitwise_sparsity"] < 1 and 0 <= o["count_sparsity"] < 1 and o["spike_accumulates"] > 0
    assert o["energy_pj"]["dense_fp16"] == pytest.approx(o["dense_macs"] * 1.5)
    assert [s["k"] for s in report["k_sweep"]] == [3.0, 4.0]  # the CLI default is 2, 2.5, 3, 3.5, 4
    zeros = [s["count_sparsity"] for s in report["k_sweep"]]
    assert zeros == sorted(zeros, reverse=True)  # a lower threshold (larger k) leaves fewer zero counts
    for name, min_width in (("sparsity_per_layer.png", 600), ("k_sweep.png", 1000)):
        image = plt.imread(out / name)  # a real picture: its size, and more than one colour in it
        assert image.shape[1] >= min_width and image.shape[0] >= 400 and image[..., :3].std() > 0.05, name
    assert (out / "report.txt").read_text() == printed


@pytest.mark.parametrize("args, match", [
    (["--k", "0"], "--k 0.0 must be > 0"),
    (["--layers", "no_such_layer"], "matches none of the checkpoint's 66 coded layers"),
    (["--checkpoint", "/nonexistent"], "no config.json"),
    (["--sweep", "2,x"], "--sweep '2,x' must be comma-separated numbers"),
])
def test_report_errors_are_one_line(tmp_path, capsys, args, match):
    assert main(["--text", str(TEXT), "--max-tokens", "16", "--out", str(tmp_path / "r"), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and match in err[0], err
