"""``python -m spb2_jax`` runs from the installed package and reproduces the official logits."""

from __future__ import annotations

import re
import subprocess
import sys


def test_demo_runs_and_matches_official_logits():
    proc = subprocess.run([sys.executable, "-m", "spb2_jax"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    diff = float(re.search(r"max \|logits - official logits\| = (\S+)", proc.stdout).group(1))
    assert diff < 1e-4, proc.stdout
    assert "forward time:" in proc.stdout
    greedy = re.search(r"next token \(greedy\): (\d+); official: (\d+)", proc.stdout)
    assert greedy.group(1) == greedy.group(2)
