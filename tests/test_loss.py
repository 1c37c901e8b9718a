"""``spb2_jax.loss``: the tiled LM-head cross-entropy against the plain ``model.causal_lm_loss`` on the logits of the
model's own head (``nn.Dense(dtype=...)`` / ``nn.Embed.attend``), and its compiled memory."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spb2_jax.checkpoint import load_hf
from spb2_jax.loss import IGNORE_INDEX, causal_lm_loss_tiled, tiled_cross_entropy
from spb2_jax.model import causal_lm_loss, loss_fn
from tests.conftest import fixture_dir

AUX_COEF = 0.01
U32 = 2.0 ** -24  # float32 unit roundoff
U16 = 2.0 ** -8  # bfloat16 unit roundoff (8 significant bits)


def _inputs(B, T, V, D, dtype=jnp.float32, kernel_dtype=None, ignore_frac=0.25, seed=0):
    """``hidden [B, T, D]``, ``kernel [D, V]``, ``labels [B, T]`` with about ``ignore_frac`` ignored, ``aux [3]``."""
    kh, kk, kl, km, ka = jax.random.split(jax.random.key(seed), 5)
    hidden = jax.random.normal(kh, (B, T, D), jnp.float32).astype(dtype)
    kernel = (jax.random.normal(kk, (D, V), jnp.float32) * 2.0 / np.sqrt(D)).astype(kernel_dtype or dtype)
    labels = jax.random.randint(kl, (B, T), 0, V)
    labels = jnp.where(jax.random.uniform(km, (B, T)) < ignore_frac, IGNORE_INDEX, labels)
    aux = jax.random.uniform(ka, (3,), jnp.float32)
    return hidden, kernel, labels, aux


def _head(hidden, kernel):
    """The model's untied head: ``nn.Dense(V, dtype=compute dtype)`` -> ``[B, T, V]`` logits."""
    dense = nn.Dense(kernel.shape[1], use_bias=False, dtype=hidden.dtype)
    return dense.apply({"params": {"kernel": kernel}}, hidden)


def _plain(hidden, kernel, labels, aux):
    return causal_lm_loss(_head(hidden, kernel), labels, aux, AUX_COEF)


def _tiled(hidden, kernel, labels, aux, tile_size):
    return causal_lm_loss_tiled(hidden, kernel, labels, aux, AUX_COEF, tile_size=tile_size)


def _value_and_grads(loss_fn, hidden, kernel, labels, aux):
    """``(parts, (d loss / d hidden, d loss / d kernel))``."""
    def scalar(h, k):
        parts = loss_fn(h, k, labels, aux)
        return parts["loss"], parts
    (_, parts), grads = jax.jit(jax.value_and_grad(scalar, argnums=(0, 1), has_aux=True))(hidden, kernel)
    return parts, grads


def _rel(a, b) -> float:
    """Relative error ``||a - b|| / ||b||`` in float64 (``||a||`` when b is all zeros)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / (np.linalg.norm(b) or 1.0))


# T not a multiple of the tile; V chunks in the backward: 2 full + a ragged 44 (V300), exactly 2 (V256),
# one chunk below the 128-lane width (V97), one tile with C clamped to T (C512), 7 full + ragged (B1-T130).
CASES = [(2, 75, 300, 40, 16), (2, 75, 256, 40, 16), (2, 33, 97, 24, 8), (2, 40, 300, 40, 512),
         (1, 130, 1000, 32, 7)]


@pytest.mark.parametrize("B,T,V,D,C", CASES, ids=[f"B{b}-T{t}-V{v}-D{d}-C{c}" for b, t, v, d, c in CASES])
def test_matches_plain_loss_float32(B, T, V, D, C):
    hidden, kernel, labels, aux = _inputs(B, T, V, D)
    want, (want_dh, want_dk) = _value_and_grads(_plain, hidden, kernel, labels, aux)
    got, (got_dh, got_dk) = _value_and_grads(lambda *a: _tiled(*a, C), hidden, kernel, labels, aux)
    for key in ("loss", "ce_loss", "aux_loss"):
        assert got[key].dtype == jnp.float32
        assert _rel(got[key], want[key]) <= 1e-6, (key, float(got[key]), float(want[key]))
    primal = jax.jit(lambda *a: _tiled(*a, C))(hidden, kernel, labels, aux)  # no autodiff: the primal rule
    assert float(primal["loss"]) == float(got["loss"])
    assert got_dh.dtype == hidden.dtype and got_dk.dtype == kernel.dtype
    assert _rel(got_dh, want_dh) <= 1e-6
    assert _rel(got_dk, want_dk) <= 1e-6


@pytest.mark.parametrize("T", [1, 37], ids=["T1-none-valid", "T37-one-valid"])
def test_nearly_all_ignored(T):
    """T=1: no valid token (the last position is always ignored), loss and grads 0 as in the plain loss.
    T=37: a single valid target."""
    hidden, kernel, labels, aux = _inputs(2, T, 150, 16, ignore_frac=0.0)
    labels = jnp.full_like(labels, IGNORE_INDEX)
    if T > 1:
        labels = labels.at[1, 20].set(7)  # predicted from position 19
    want, (want_dh, want_dk) = _value_and_grads(_plain, hidden, kernel, labels, jnp.zeros(3))
    got, (got_dh, got_dk) = _value_and_grads(lambda *a: _tiled(*a, 8), hidden, kernel, labels, jnp.zeros(3))
    if T == 1:
        assert float(want["loss"]) == float(got["loss"]) == 0.0
        assert not np.any(np.asarray(got_dh)) and not np.any(np.asarray(got_dk))
    assert _rel(got["loss"], want["loss"]) <= 1e-6
    assert _rel(got_dh, want_dh) <= 1e-6 and _rel(got_dk, want_dk) <= 1e-6


def test_tied_embeddings_float32():
    """Tied head: the caller passes ``embedding.T``; the gradient reaches the ``[V, D]`` embedding."""
    hidden, kernel, labels, aux = _inputs(2, 45, 300, 24)
    embedding = kernel.T  # [V, D]
    embed = nn.Embed(300, 24, dtype=jnp.float32)

    def plain(e):
        logits = embed.apply({"params": {"embedding": e}}, hidden, method=nn.Embed.attend)  # [B, T, V]
        return causal_lm_loss(logits, labels, aux, AUX_COEF)["loss"]

    def tiled(e):
        return causal_lm_loss_tiled(hidden, e.T, labels, aux, AUX_COEF, tile_size=16)["loss"]

    want, want_de = jax.jit(jax.value_and_grad(plain))(embedding)
    got, got_de = jax.jit(jax.value_and_grad(tiled))(embedding)
    assert _rel(got, want) <= 1e-6 and _rel(got_de, want_de) <= 1e-6


def test_float64_under_x64():
    """float64 inputs under x64: accumulation in float64, like the plain loss (``acc_dtype``)."""
    with jax.enable_x64(True):
        hidden, kernel, labels, aux = _inputs(2, 29, 300, 16, dtype=jnp.float64)
        want, (want_dh, want_dk) = _value_and_grads(_plain, hidden, kernel, labels, aux)
        got, (got_dh, got_dk) = _value_and_grads(lambda *a: _tiled(*a, 8), hidden, kernel, labels, aux)
        assert got["loss"].dtype == jnp.float64 and got_dh.dtype == jnp.float64
        assert _rel(got["loss"], want["loss"]) <= 1e-13
        assert _rel(got_dh, want_dh) <= 1e-13 and _rel(got_dk, want_dk) <= 1e-13


@pytest.mark.parametrize("kernel_dtype", [jnp.bfloat16, jnp.float32], ids=["kernel-bf16", "kernel-f32"])
def test_bfloat16(kernel_dtype):
    """bfloat16 compute (bf16 hidden; bf16 params, or float32 params cast by the head as in mixed precision).

    Loss bound. Both paths compute the same bf16 logits (the head's matmul is row-sliceable: a tile's logits are
    the rows of the full logits, bit for bit, checked below), cast them to float32 and evaluate, per token,
    ``nll = log(sum_v exp(x_v - max)) - (x_target - max)``; the elementwise float32 ops see identical inputs and
    give identical outputs, so only the summation orders can differ: the exp-sum over V (relative error at most
    ``(V - 1) u`` in either path, u = 2^-24, so the log differs by at most ``2 (V - 1) u``) and the sum over the N
    valid tokens (at most ``(N - 1) u * sum nll`` each). Hence ``|ce_tiled - ce_plain| <= 2 u (V - 1 + (N - 1) ce)``.

    Gradient bound: ``dlogits`` is rounded to bf16 in both paths; the plain path then rounds ``dh`` and the
    bf16-kernel gradient to bf16 (relative <= 2^-8 each), the tiled path accumulates in float32 and rounds once
    at the end; so the relative difference is at most about two bf16 roundings, ``2 * 2^-8``.
    """
    B, T, V, D, C = 2, 75, 300, 40, 16
    hidden, kernel, labels, aux = _inputs(B, T, V, D, dtype=jnp.bfloat16, kernel_dtype=kernel_dtype)
    full = _head(hidden, kernel)  # [B, T, V] bf16
    for s in range(0, T, C):
        tile = jax.jit(_head)(hidden[:, s:s + C], kernel)  # [B, C, V]
        np.testing.assert_array_equal(np.asarray(tile, np.float32), np.asarray(full[:, s:s + C], np.float32))

    want, (want_dh, want_dk) = _value_and_grads(_plain, hidden, kernel, labels, aux)
    got, (got_dh, got_dk) = _value_and_grads(lambda *a: _tiled(*a, C), hidden, kernel, labels, aux)
    n_valid = int(np.sum(np.asarray(labels[:, 1:]) != IGNORE_INDEX))
    ce = float(want["ce_loss"])
    bound = 2 * U32 * (V - 1 + (n_valid - 1) * ce)
    assert got["ce_loss"].dtype == jnp.float32
    assert abs(float(got["ce_loss"]) - ce) <= bound, (float(got["ce_loss"]), ce, bound)
    assert abs(float(got["loss"]) - float(want["loss"])) <= bound + U32 * abs(float(want["loss"]))
    assert got_dh.dtype == jnp.bfloat16 and got_dk.dtype == kernel_dtype
    assert _rel(got_dh, want_dh) <= 2 * U16
    assert _rel(got_dk, want_dk) <= 2 * U16


def test_shape_errors():
    hidden, kernel, labels, aux = _inputs(2, 10, 50, 8)
    with pytest.raises(ValueError, match=r"labels shape \(2, 9\) != hidden batch/time shape \(2, 10\)"):
        causal_lm_loss_tiled(hidden, kernel, labels[:, :9], aux, AUX_COEF)
    with pytest.raises(ValueError, match=r"hidden.shape=\(2, 10, 8\).*head_kernel.shape=\(7, 50\)"):
        tiled_cross_entropy(hidden, kernel[:7], labels)
    with pytest.raises(ValueError, match=r"hidden must be \[B, T, D\], got hidden.shape=\(10, 8\)"):
        causal_lm_loss_tiled(hidden[0], kernel, labels[0], aux, AUX_COEF)
    with pytest.raises(ValueError, match="tile_size=0"):
        tiled_cross_entropy(hidden, kernel, labels, tile_size=0)


def _compiled_temp_bytes(loss_fn, B, T, V, D, hidden_dtype) -> int:
    """Temporary bytes of jitted loss + grads (hidden, kernel) on abstract float32-kernel inputs."""
    args = (jax.ShapeDtypeStruct((B, T, D), hidden_dtype), jax.ShapeDtypeStruct((D, V), jnp.float32),
            jax.ShapeDtypeStruct((B, T), jnp.int32), jax.ShapeDtypeStruct((3,), jnp.float32))
    grad = jax.value_and_grad(lambda h, k, labels, aux: loss_fn(h, k, labels, aux)["loss"], argnums=(0, 1))
    return jax.jit(grad).lower(*args).compile().memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("hidden_dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16-hidden"])
def test_memory_32k(hidden_dtype):
    """B=1, T=32,768, V=151,936, D=2,560: compiled temporaries of loss + grads vs the ``[B, T, V]`` f32 logits.

    float32: under 10 % of the logits (measured on XLA:CPU: 1.61 GB = 8.1 % of 19.9 GB; the plain loss: 79.7 GB).
    bf16 hidden, float32 kernel: XLA:CPU has no bf16 matmul and upcasts the operands, adding a float32 copy of the
    bf16-rounded ``[D, V]`` kernel (1.56 GB) and float32 copies of ``[B, T, D]``; measured 3.86 GB, so the bound
    here is 10 % of the plain loss's temporaries at the same dtypes (60.1 GB) instead.
    """
    B, T, V, D = 1, 32_768, 151_936, 2_560
    logits_bytes = B * T * V * 4
    tiled = _compiled_temp_bytes(lambda *a: _tiled(*a, 512), B, T, V, D, hidden_dtype)
    print(f"tiled temp {tiled / 1e9:.3f} GB = {tiled / logits_bytes:.2%} of f32 logits")
    if hidden_dtype == jnp.float32:
        assert tiled < 0.1 * logits_bytes
    else:
        plain = _compiled_temp_bytes(_plain, B, T, V, D, hidden_dtype)
        print(f"plain temp {plain / 1e9:.3f} GB")
        assert tiled < 0.1 * plain


@pytest.mark.parametrize("name", ["tiny-var", "tiny-leftpad"])
def test_loss_fn_equals_the_official_loss(name):
    """``model.loss_fn`` (the tiled loss over the final hidden states) against the official model's loss, CE and
    aux loss on an untied (tiny-var) and a left-padded tied (tiny-leftpad) fixture, within the fixtures' 1e-4."""
    config, params = load_hf(fixture_dir(name), progress=False)
    inputs = np.load(fixture_dir(name) / "inputs.npz")
    ref = np.load(fixture_dir(name) / "outputs.npz")
    mask = inputs["attention_mask"] if "attention_mask" in inputs else None
    _, parts = jax.jit(lambda p: loss_fn(p, config, jnp.asarray(inputs["input_ids"]), jnp.asarray(inputs["labels"]),
                                         mask, tile_size=32))(params)
    for key in ("loss", "ce_loss", "aux_loss"):
        assert abs(float(parts[key]) - float(ref[key])) <= 1e-4, (key, float(parts[key]), float(ref[key]))
