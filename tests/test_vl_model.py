"""SpB2.0-VL end to end against the official tiny-vl fixture (CPU, float32): logits with and without the official
bf16 q/k rounding, the losses, export -> load, and the errors for inputs that do not fit together.

The bf16 bound. With ``official_qk_bf16`` every q / k element is rounded to bfloat16 after its norm. Two float32
implementations of the same model (torch's and XLA's summation orders) differ by a few float32 ulps before that
rounding, so an element lying within that distance of a bf16 rounding boundary may round the other way in one of
them: a *flip*, which moves that element by one bf16 ulp (2^-8 relative) and propagates. We bound the effect by an
independent run of our own model in which every q / k element within ``DELTA = 2^-22`` (4 float32 ulps, relative)
of a boundary is rounded the other way: the official logits must lie within that run's distance from ours. And
teacher-forced layer by layer, the only difference allowed beyond 1e-5 is one such flip (checked by finding it).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import spb2_jax.layers.attention as attention_layer
import spb2_jax.layers.sse_swa as sse_swa_layer
from spb2_jax.checkpoint.vl import load_vl, save_vl
from spb2_jax.layers.block import DecoderBlock
from spb2_jax.model import build_segments
from spb2_jax.options import resolve_options
from spb2_jax.vl_model import SpB2VLForConditionalGeneration, prepare_vl_inputs, vl_loss
from tests.helpers import SHARED

VL = SHARED / "fixtures" / "official-vl" / "tiny-vl"
DELTA = 2.0 ** -22


@pytest.fixture(scope="module")
def vl():
    if not (VL / "outputs.npz").is_file():
        raise FileNotFoundError(f"VL fixture not found at {VL}: the tests need ../shared beside the repository")
    config, params = load_vl(VL, progress=False)
    i, o = np.load(VL / "inputs.npz"), np.load(VL / "outputs.npz")
    prep = prepare_vl_inputs(config, i["input_ids"], i["attention_mask"], pixel_values=i["pixel_values"],
                             image_grid_thw=i["image_grid_thw"])
    return config, params, i, o, prep


def _forward(vl, bf16: bool, **kw):
    config, params, i, _, prep = vl
    model = SpB2VLForConditionalGeneration(config, resolve_options(config.text, official_qk_bf16=bf16))

    def run(p, ids, mask, pixels, vision, mrope):
        return model.apply({"params": p}, ids, mask, pixel_values=pixels, vision=vision, mrope=mrope, **kw)

    return jax.jit(run)(params, jnp.asarray(i["input_ids"]), jnp.asarray(i["attention_mask"]),
                        jnp.asarray(i["pixel_values"]), prep["vision"], jnp.asarray(prep["mrope"]))


def _near_tie(x: jax.Array, delta: float) -> jax.Array:
    """Elements of float32 ``x`` within ``delta`` (relative) of a bfloat16 rounding boundary."""
    bits = jax.lax.bitcast_convert_type(jnp.abs(x.astype(jnp.float32)), jnp.uint32)
    frac = (bits & 0xFFFF).astype(jnp.float32) / 65536.0  # position inside the bf16 ulp; 0.5 is the boundary
    return jnp.abs(frac - 0.5) * 2.0 ** -8 < delta


def _flipped_rounding(select):
    """A ``round_bf16`` that rounds the elements ``select(x)`` marks to the other neighbouring bfloat16."""
    def round_bf16(x):
        x32 = x.astype(jnp.float32)
        near = x32.astype(jnp.bfloat16)
        other = jnp.nextafter(near, jnp.where(x32 > near.astype(jnp.float32), jnp.inf, -jnp.inf).astype(jnp.bfloat16))
        return jnp.where(select(x32), other, near).astype(x.dtype)
    return round_bf16


def _patch_rounding(monkeypatch, fn):
    monkeypatch.setattr(attention_layer, "round_bf16", fn)
    monkeypatch.setattr(sse_swa_layer, "round_bf16", fn)


def test_float32_logits_and_vision_outputs_match_the_official_model(vl):
    _, _, i, o, _ = vl
    out = _forward(vl, False, output_hidden_states=True)
    real = i["attention_mask"][0] == 1
    np.testing.assert_allclose(np.asarray(out.logits)[0, real], o["logits_nobf16"][0, real], rtol=0, atol=1e-4)
    np.testing.assert_allclose(np.asarray(out.image_embeds), o["image_embeds"], rtol=0, atol=1e-5)
    np.testing.assert_allclose(np.asarray(out.deepstack_embeds), o["deepstack_embeds"], rtol=0, atol=1e-5)
    np.testing.assert_allclose(np.asarray(out.layer_inputs[0]), o["layer_inputs"][0], rtol=0, atol=1e-5)


def test_losses_follow_the_official_label_convention(vl):
    config, _, i, o, _ = vl
    parts = vl_loss(_forward(vl, True), jnp.asarray(i["labels"]), config)
    for key in ("loss", "ce_loss", "aux_loss"):
        assert float(parts[key]) == pytest.approx(float(o[key]), abs=1e-4), key


def test_bf16_logits_lie_within_the_rounding_flip_bound(vl, monkeypatch):
    """First-order bound: the official run rounds some subset of the near-tie elements the other way; each flip
    alone moves our logits by a measured amount, so the official logits lie within the sum of those amounts."""
    config, params, i, o, prep = vl
    real = i["attention_mask"][0] == 1
    ours = np.asarray(_forward(vl, True).logits)[0, real]
    model = SpB2VLForConditionalGeneration(config, resolve_options(config.text, official_qk_bf16=True))
    args = (jnp.asarray(i["input_ids"]), jnp.asarray(i["attention_mask"]))
    kw = dict(pixel_values=jnp.asarray(i["pixel_values"]), vision=prep["vision"], mrope=prep["mrope"])

    @jax.jit
    def rounded_inputs(p):  # the arrays each call site rounds, returned from one compiled forward
        traced = []
        with monkeypatch.context() as m:
            _patch_rounding(m, lambda x: (traced.append(x), x.astype(jnp.bfloat16).astype(x.dtype))[1])
            model.apply({"params": p}, *args, **kw)
        return traced

    seen = [np.asarray(x) for x in rounded_inputs(params)]
    candidates = [(c, int(j)) for c, x in enumerate(seen)
                  for j in np.flatnonzero(np.asarray(_near_tie(jnp.asarray(x), DELTA)))]

    @jax.jit
    def flipped(call, index):
        calls = iter(range(len(seen)))

        def one_flip(x):
            mine = next(calls) == call  # the call sites are numbered while tracing
            pick = (jnp.arange(x.size) == index).reshape(x.shape) & mine
            return _flipped_rounding(lambda _: pick)(x)

        with monkeypatch.context() as m:
            _patch_rounding(m, one_flip)
            return model.apply({"params": params}, *args, **kw).logits

    effects = [np.abs(np.asarray(flipped(c, j))[0, real] - ours).max() for c, j in candidates]
    bound = float(np.sum(effects))
    error = float(np.abs(ours - o["logits"][0, real]).max())
    assert len(candidates) >= 1 and bound < 0.112  # smaller than the whole rounding's effect |logits - nobf16|
    assert error <= bound, (error, bound, len(candidates))


@pytest.mark.parametrize("layer", range(6))
def test_teacher_forced_bf16_layers_match_up_to_one_rounding_flip(vl, monkeypatch, layer):
    config, params, i, o, prep = vl
    opts = resolve_options(config.text, official_qk_bf16=True)
    seg = build_segments(jnp.asarray(i["input_ids"]), jnp.asarray(i["attention_mask"]), None).replace(
        mrope=jnp.asarray(prep["mrope"]))
    real = i["attention_mask"][0] == 1
    block = DecoderBlock(config.text, layer, opts)

    def error(run=block.apply):
        out, mixed, _, _ = run({"params": params["model"][f"layers_{layer}"]}, jnp.asarray(o["layer_inputs"][layer]),
                               seg)
        return max(np.abs(np.asarray(mixed)[0, real] - o["attn_outputs"][layer][0, real]).max(),
                   np.abs(np.asarray(out)[0, real] - o["layer_outputs"][layer][0, real]).max())

    if error(jax.jit(block.apply)) <= 1e-5:  # compiled once; the flip search below runs op by op
        return
    base = error()
    if base <= 1e-5:
        return
    seen = []  # every array rounded in this layer (q and k), to list the near-tie candidates
    _patch_rounding(monkeypatch, lambda x: (seen.append(np.asarray(x)), x.astype(jnp.bfloat16).astype(x.dtype))[1])
    error()
    candidates = [(c, int(j)) for c, x in enumerate(seen)
                  for j in np.flatnonzero(np.asarray(_near_tie(jnp.asarray(x), DELTA)))]
    assert candidates, f"layer {layer}: error {base:.2e} and no q / k element near a bf16 boundary"
    best = np.inf
    for call, index in candidates:
        counter = iter(range(len(seen)))

        def one_flip(x, call=call, index=index, counter=counter):
            mine = next(counter) == call
            flat = jnp.zeros(x.size, bool).at[index].set(mine)
            return _flipped_rounding(lambda _: flat.reshape(x.shape))(x)

        _patch_rounding(monkeypatch, one_flip)
        best = min(best, error())
    assert best <= 1e-5, f"layer {layer}: {base:.2e}, best single flip {best:.2e} over {len(candidates)} candidates"


def test_export_then_load_is_exact(vl, tmp_path):
    config, params, *_ = vl
    save_vl(config, params, tmp_path / "vl", progress=False)
    again_config, again = load_vl(tmp_path / "vl", progress=False)
    assert again_config.to_dict() == config.to_dict()
    mine, theirs = jax.tree_util.tree_flatten_with_path(params)[0], jax.tree_util.tree_flatten_with_path(again)[0]
    assert [p for p, _ in mine] == [p for p, _ in theirs]
    for (path, a), (_, b) in zip(mine, theirs):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(path))
    from safetensors.numpy import load_file

    original, written = load_file(VL / "model.safetensors"), load_file(tmp_path / "vl" / "model.safetensors")
    assert set(written) == set(original) - {"lm_head.weight"}  # tied head written once, as the official save
    for name, value in written.items():
        np.testing.assert_array_equal(value, original[name], err_msg=name)


def test_inputs_that_do_not_fit_together_give_one_clear_error(vl):
    config, _, i, _, _ = vl
    ids, mask, pv, grid = i["input_ids"], i["attention_mask"], i["pixel_values"], i["image_grid_thw"]
    fewer = ids.copy()
    fewer[0, 25] = 7
    cases = [
        (dict(input_ids=fewer, pixel_values=pv, image_grid_thw=grid), "11 <|image_pad|> tokens but image_grid_thw"),
        (dict(input_ids=ids, pixel_values=pv[:, :383], image_grid_thw=grid), "rows must be 384 wide"),
        (dict(input_ids=ids, pixel_values=pv[:44], image_grid_thw=grid), "pixel_values has 44 rows"),
        (dict(input_ids=ids), "12 <|image_pad|> tokens but no images"),
        (dict(input_ids=ids, pixel_values=pv), "pass both or neither"),
    ]
    for kw, match in cases:
        with pytest.raises(ValueError, match=match.replace("|", r"\|")):
            prepare_vl_inputs(config, kw.pop("input_ids"), mask, **kw)


def test_load_pretrained_returns_a_vl_handle():
    """``spb2_jax.load_pretrained`` recognises ``model_type == "spb2_vl"``: the handle runs with the official bf16
    q/k rounding by default; ``official_qk_bf16=False`` is the pure-float32 model (``logits_nobf16``)."""
    import spb2_jax

    i, o = np.load(VL / "inputs.npz"), np.load(VL / "outputs.npz")
    assert spb2_jax.load_pretrained(VL).options.official_qk_bf16
    model = spb2_jax.load_pretrained(VL, official_qk_bf16=False)
    assert isinstance(model, spb2_jax.VLModel)
    out = model(i["input_ids"], i["attention_mask"], pixel_values=i["pixel_values"],
                image_grid_thw=i["image_grid_thw"])
    np.testing.assert_allclose(np.asarray(out.logits)[0], o["logits_nobf16"][0], rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match="outside"):
        model(np.asarray([[1, 400]]))
