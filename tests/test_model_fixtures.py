"""The Flax model equals the official PyTorch model on all six golden fixtures (float32, CPU).

Every output is compared on real (unpadded) tokens within 1e-4 absolute, the issue's bound; the official code
reproduces itself to ~5e-6 and we measured <= 2.2e-5 (see the foundation issue's note). Training mode with SWA
dropout on is checked in ``test_model_grad`` (``test_swa_dropout_*``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spb2_jax.checkpoint import load_hf
from spb2_jax.model import SpB2ForCausalLM, causal_lm_loss
from tests.helpers import FIXTURES, fixture_dir

ATOL = 1e-4
PALLAS_DEFAULT = ("tiny-mask", "tiny-leftpad")  # MoBA, full, SWA, SSE-GDN mask and varlen forms, left padding


def _run(name, impl="xla"):
    """``(config, inputs, outputs with hidden states and mixer outputs, real-token mask)`` of one fixture."""
    path = fixture_dir(name)
    config, params = load_hf(path, progress=False)
    inputs = np.load(path / "inputs.npz")
    mask = inputs["attention_mask"] if "attention_mask" in inputs else None
    model = SpB2ForCausalLM(config, impl=impl)
    forward = jax.jit(lambda p, ids, m: model.apply({"params": p}, ids, m, output_hidden_states=True,
                                                    output_mixer_outputs=True))
    out = forward(params, jnp.asarray(inputs["input_ids"]), None if mask is None else jnp.asarray(mask))
    real = np.ones(inputs["input_ids"].shape, bool) if mask is None else mask.astype(bool)
    return config, inputs, out, real


def _max_err(ours, theirs, real):
    return float(np.abs(np.asarray(ours)[real] - np.asarray(theirs)[real]).max())


@pytest.mark.parametrize("name,impl", [
    pytest.param(name, impl, id=f"{name}-{impl}",
                 marks=pytest.mark.slow if impl == "pallas" and name not in PALLAS_DEFAULT else ())
    for name in FIXTURES for impl in ("xla", "reference", "pallas")])
def test_forward_matches_official(name, impl):
    """Every implementation: the default linear-in-T "xla" path, the per-token "reference" and the Pallas
    kernels ("pallas", interpret mode on CPU). "xla" and "reference" run on all six fixtures by default; "pallas"
    on tiny-mask and tiny-leftpad, which between them run every Pallas kernel the model calls (MoBA, full
    causal and sliding-window attention, the gated delta rule in both SSE forms) with and without left padding.
    The other four "pallas" runs are slow: their layers are the same kernels (checked kernel by kernel in
    test_pallas_kernels), GLA has no Pallas kernel (impl="pallas" runs it on the XLA path, which the "xla" runs of
    tiny-gla and tiny-gla-mask check), and interpret mode is slow."""
    config, inputs, out, real = _run(name, impl)
    ref = np.load(fixture_dir(name) / "outputs.npz")
    L = config.num_hidden_layers
    errors = {"logits": _max_err(out.logits, ref["logits"], real),
              "last_block_output": _max_err(out.last_block_output, ref["last_block_output"], real),
              "last_hidden_state": _max_err(out.hidden_states[L], ref["last_hidden_state"], real)}
    assert len(out.hidden_states) == L + 1 and len(out.mixer_outputs) == L
    for i in range(L + 1):
        errors[f"hidden_states[{i}]"] = _max_err(out.hidden_states[i], ref["hidden_states"][i], real)
    for i in range(L):
        errors[f"attn_outputs[{i}]"] = _max_err(out.mixer_outputs[i], ref["attn_outputs"][i], real)
    errors["aux_losses_per_layer"] = float(np.abs(np.asarray(out.aux_losses) - ref["aux_losses_per_layer"]).max())
    parts = causal_lm_loss(out.logits, jnp.asarray(inputs["labels"]), out.aux_losses, config.aux_loss_coef)
    for key in ("loss", "ce_loss", "aux_loss"):
        errors[key] = abs(float(parts[key]) - float(ref[key]))
    bad = {k: v for k, v in errors.items() if not v <= ATOL}
    assert not bad, f"outputs off by more than {ATOL}: {bad}"


def test_padding_positions_have_zero_mixer_output():
    _, inputs, out, real = _run("tiny-leftpad")
    assert (~real).any()
    for mixed in out.mixer_outputs:
        assert np.all(np.asarray(mixed)[~real] == 0)


def test_left_padded_row_equals_unpadded_row():
    """A left-padded row gives the same logits on its real tokens as the same tokens without padding."""
    path = fixture_dir("tiny-leftpad")
    config, params = load_hf(path, progress=False)
    inputs = np.load(path / "inputs.npz")
    mask = inputs["attention_mask"][1].astype(bool)
    forward = jax.jit(SpB2ForCausalLM(config).apply)
    padded = forward({"params": params}, jnp.asarray(inputs["input_ids"][1:2]),
                     jnp.asarray(inputs["attention_mask"][1:2])).logits[0]
    alone = forward({"params": params}, jnp.asarray(inputs["input_ids"][1:2, mask])).logits[0]
    np.testing.assert_allclose(np.asarray(padded)[mask], np.asarray(alone), atol=2e-5, rtol=0)
