"""The options are resolved once, at the model boundary: every token mixer, prefill and decode follow the record,
and nothing below ``resolve_options`` looks at the backend again."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spb2_jax.checkpoint import load_hf
from spb2_jax.config import LayerKind
from spb2_jax.generate import decode_step, init_cache, prefill
from spb2_jax.model import SpB2ForCausalLM
from spb2_jax.ops import dispatch
from spb2_jax.options import Kernels, ModelOptions, resolve_options
from tests.conftest import fixture_dir

# the functions dispatch routes to, by (op, path); a spy on each counts its calls while tracing
ROUTES = {
    ("attention", "reference"): "attention_reference",
    ("moba", "reference"): "moba_attention_reference",
    ("gdn", "reference"): "gated_delta_rule_reference",
    ("gla", "reference"): "gla_reference",
    ("full", "xla"): "causal_attention",
    ("window", "xla"): "sliding_window_attention",
    ("moba", "xla"): "moba_attention",
    ("gdn", "xla"): "chunk_gated_delta_rule",
    ("gla", "xla"): "chunk_gla",
}


@pytest.fixture
def calls(monkeypatch):
    """Counts of the calls each dispatch target receives (keys of ``ROUTES``). The jit caches are cleared so that
    programs traced by earlier tests are traced again (through the spies)."""
    jax.clear_caches()
    counts = {key: 0 for key in ROUTES}
    for key, name in ROUTES.items():
        fn = getattr(dispatch, name)

        def spy(*args, _fn=fn, _key=key, **kwargs):
            counts[_key] += 1
            return _fn(*args, **kwargs)

        monkeypatch.setattr(dispatch, name, spy)
    return counts


def _reset(calls):
    for key in calls:
        calls[key] = 0


def _expected(config, impl):
    """Calls a forward over all layers makes, per route, for ``impl`` in ("reference", "xla")."""
    kinds = config.layer_kinds
    n_sse = sum(k in (LayerKind.SSE_GDN, LayerKind.SSE_GLA) for k in kinds)
    want = {key: 0 for key in ROUTES}
    if impl == "reference":
        want["attention", "reference"] = kinds.count(LayerKind.FULL) + n_sse  # full + SWA halves
        want["moba", "reference"] = kinds.count(LayerKind.MOBA)
        want["gdn", "reference"] = kinds.count(LayerKind.SSE_GDN)
        want["gla", "reference"] = kinds.count(LayerKind.SSE_GLA)
    else:
        want["full", "xla"] = kinds.count(LayerKind.FULL)
        want["window", "xla"] = n_sse
        want["moba", "xla"] = kinds.count(LayerKind.MOBA)
        want["gdn", "xla"] = kinds.count(LayerKind.SSE_GDN)
        want["gla", "xla"] = kinds.count(LayerKind.SSE_GLA)
    return want


@pytest.mark.parametrize("fixture", ["tiny", "tiny-gla"])
@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_impl_changes_the_path_of_every_token_mixer(calls, fixture, impl):
    """The forward, a fresh prefill and a later prefill piece route every mixer by the options; decode steps of
    SSE layers run one recurrence step (the reference scan) whatever the impl."""
    config, params = load_hf(fixture_dir(fixture), progress=False)
    options = resolve_options(config, impl=impl)
    ids = jnp.asarray(np.arange(1, 13, dtype=np.int32)[None] % config.vocab_size)
    want = _expected(config, impl)

    _reset(calls)  # load_hf traced an init
    jax.eval_shape(lambda p: SpB2ForCausalLM(config, options).apply({"params": p}, ids), params)
    assert calls == want, "forward"

    cache = init_cache(config, 1, 32)
    _reset(calls)
    _, cache = prefill(params, config, ids[:, :8], cache, options=options)  # fresh: the forward's ops
    assert calls == want, "fresh prefill"

    _reset(calls)
    _, cache = prefill(params, config, ids[:, 8:], cache, options=options)  # later piece: recurrences only
    rec = {key: (n if key[0] in ("gdn", "gla") else 0) for key, n in want.items()}
    assert calls == rec, "second prefill piece"

    _reset(calls)
    decode_step(params, config, ids[:, :1], cache, options=options)
    one_step = {key: 0 for key in ROUTES}
    one_step["gdn", "reference"] = config.layer_kinds.count(LayerKind.SSE_GDN)
    one_step["gla", "reference"] = config.layer_kinds.count(LayerKind.SSE_GLA)
    assert calls == one_step, "decode step"


def test_nothing_below_the_boundary_asks_for_the_backend(monkeypatch):
    """Options resolved for Pallas (interpret mode, the Triton-style kernels); then ``jax.default_backend`` is
    made to fail: forward, prefill and decode still run, so no op, layer or kernel wrapper re-decides."""
    config, params = load_hf(fixture_dir("tiny"), progress=False)
    options = resolve_options(config, impl="pallas", backend="cpu")
    assert options.kernels == Kernels(impl="pallas", attention="pallas", window="pallas", moba="pallas",
                                      gdn="pallas", gla="xla", target="triton", interpret=True,
                                      moba_algorithm="gathered")

    def no_backend(*_):
        raise AssertionError("jax.default_backend() called below resolve_options")

    monkeypatch.setattr(jax, "default_backend", no_backend)
    ids = jnp.asarray(np.arange(1, 11, dtype=np.int32)[None])
    jax.eval_shape(lambda p: SpB2ForCausalLM(config, options).apply({"params": p}, ids), params)
    cache = init_cache(config, 1, 16)
    _, cache = prefill(params, config, ids, cache, options=options)
    decode_step(params, config, ids[:, :1], cache, options=options)


def test_resolution_states_the_fallbacks():
    """GLA has no kernel; the GDN kernel is float32-only; TPU gets the Mosaic kernels, gathered MoBA as on GPU."""
    k = resolve_options(impl="pallas", backend="gpu").kernels
    assert (k.gla, k.gdn, k.target, k.interpret, k.moba_algorithm) == ("xla", "pallas", "triton", False, "gathered")
    k64 = resolve_options(impl="pallas", dtype=jnp.float64, backend="cpu").kernels
    assert (k64.gdn, k64.interpret) == ("xla", True)
    tpu = resolve_options(impl="pallas", backend="tpu").kernels
    assert (tpu.target, tpu.moba_algorithm, tpu.interpret) == ("mosaic_tpu", "gathered", False)
    ref = resolve_options(impl="reference").kernels
    assert {ref.attention, ref.window, ref.moba, ref.gdn, ref.gla} == {"reference"}


@pytest.mark.parametrize("bad, match", [
    (dict(impl="triton"), "impl='triton'"),
    (dict(dtype="int8"), "dtype='int8'"),
    (dict(remat="some"), "remat='some'"),
    (dict(moba_decode="sparse"), "moba_decode='sparse'"),
    (dict(impl="pallas", target="cuda"), "target='cuda'"),
    (dict(impl="pallas", backend="tpu", moba_algorithm="sparse"), "moba_algorithm=.sparse."),
])
def test_bad_options_name_the_field(bad, match):
    with pytest.raises(ValueError, match=match):
        resolve_options(**bad)


def test_options_and_old_keywords_are_one_source_of_truth():
    config, _ = load_hf(fixture_dir("tiny"), progress=False)
    legacy = SpB2ForCausalLM(config, impl="reference", dtype=jnp.bfloat16).resolved_options
    assert legacy == resolve_options(config, impl="reference", dtype="bfloat16")
    with pytest.raises(ValueError, match="either options="):
        SpB2ForCausalLM(config, ModelOptions(), impl="xla").resolved_options  # noqa: B018
    assert hash(legacy) == hash(resolve_options(config, impl="reference", dtype=jnp.bfloat16))
