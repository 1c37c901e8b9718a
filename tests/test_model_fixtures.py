"""The Flax model equals the official PyTorch model on all six golden fixtures (float32, CPU).

Every output is compared on real (unpadded) tokens within 1e-4 absolute, the issue's bound; the official code
reproduces itself to ~5e-6 and we measured <= 2.2e-5 (see the foundation issue's note).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spb2_jax.checkpoint import load_hf
from spb2_jax.model import SpB2ForCausalLM, causal_lm_loss

ATOL = 1e-4


def _run(path, deterministic=True, rng=None, impl="xla"):
    config, params = load_hf(path, progress=False)
    inputs = np.load(path / "inputs.npz")
    mask = inputs["attention_mask"] if "attention_mask" in inputs else None
    model = SpB2ForCausalLM(config, impl=impl)
    out = model.apply({"params": params}, jnp.asarray(inputs["input_ids"]),
                      None if mask is None else jnp.asarray(mask), deterministic=deterministic,
                      output_hidden_states=True, output_mixer_outputs=True,
                      rngs=None if rng is None else {"dropout": rng})
    real = np.ones(inputs["input_ids"].shape, bool) if mask is None else mask.astype(bool)
    return config, inputs, out, real


def _max_err(ours, theirs, real):
    return float(np.abs(np.asarray(ours)[real] - np.asarray(theirs)[real]).max())


@pytest.mark.parametrize("impl", ["xla", "reference", "pallas"])
def test_forward_matches_official(official_fixture, impl):
    """Every implementation: the default linear-in-T "xla" path, the per-token "reference" and the Pallas
    kernels ("pallas", interpret mode on CPU)."""
    config, inputs, out, real = _run(official_fixture, impl=impl)
    ref = np.load(official_fixture / "outputs.npz")
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


def test_train_mode_without_dropout_equals_eval(official_fixture):
    """Fixtures have swa_dropout=0: the training-mode forward must equal the eval forward exactly."""
    _, _, out_eval, real = _run(official_fixture)
    _, _, out_train, _ = _run(official_fixture, deterministic=False, rng=jax.random.key(1))
    np.testing.assert_array_equal(np.asarray(out_train.logits)[real], np.asarray(out_eval.logits)[real])


def test_padding_positions_have_zero_mixer_output():
    from tests.conftest import fixture_dir
    _, inputs, out, real = _run(fixture_dir("tiny-leftpad"))
    assert (~real).any()
    for mixed in out.mixer_outputs:
        assert np.all(np.asarray(mixed)[~real] == 0)


def test_left_padded_row_equals_unpadded_row():
    """A left-padded row gives the same logits on its real tokens as the same tokens without padding."""
    from tests.conftest import fixture_dir
    path = fixture_dir("tiny-leftpad")
    config, params = load_hf(path, progress=False)
    inputs = np.load(path / "inputs.npz")
    mask = inputs["attention_mask"][1].astype(bool)
    model = SpB2ForCausalLM(config)
    padded = model.apply({"params": params}, jnp.asarray(inputs["input_ids"][1:2]),
                         jnp.asarray(inputs["attention_mask"][1:2])).logits[0]
    alone = model.apply({"params": params}, jnp.asarray(inputs["input_ids"][1:2, mask])).logits[0]
    np.testing.assert_allclose(np.asarray(padded)[mask], np.asarray(alone), atol=2e-5, rtol=0)
