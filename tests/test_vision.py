"""The vision side of SpB2.0-VL against the official tiny-vl fixture (CPU, float32): patchify, M-RoPE positions
and tables, the vision tower block by block, the mergers; and the errors for bad images and prompts."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from flax.linen import meta
from safetensors.numpy import load_file

from spb2_jax.vision import names, positions
from spb2_jax.vision.config import VisionConfig
from spb2_jax.vision.preprocess import patchify, patchify_images, smart_resize
from spb2_jax.vision.tower import VisionTower
from tests.helpers import SHARED

VL = SHARED / "fixtures" / "official-vl" / "tiny-vl"


@pytest.fixture(scope="module")
def fx():
    if not (VL / "outputs.npz").is_file():
        raise FileNotFoundError(f"VL fixture not found at {VL}: the tests need ../shared beside the repository")
    cfg = json.loads((VL / "config.json").read_text())
    return cfg, VisionConfig.from_dict(cfg["vision_config"]), np.load(VL / "inputs.npz"), np.load(VL / "outputs.npz")


def _rope_index(cfg, vc, ids, grid, mask=None):
    return positions.get_rope_index(ids, grid, mask, image_token_id=cfg["image_token_id"],
                                    vision_start_token_id=cfg["vision_start_token_id"],
                                    spatial_merge_size=vc.spatial_merge_size)


def test_patchify_equals_the_official_processor_exactly(fx):
    _, vc, i, _ = fx
    rows, grid = patchify(i["image_0"], vc)
    np.testing.assert_array_equal(rows, i["pixel_values"])
    np.testing.assert_array_equal(grid, i["image_grid_thw"][0])
    both, grids = patchify_images([i["image_0"], i["image_0"][:32, :48]], vc)
    assert both.shape == (48 + 24, vc.patch_dim) and grids.tolist() == [[1, 6, 8], [1, 4, 6]]


def test_mrope_positions_deltas_and_tables(fx):
    cfg, vc, i, o = fx
    pos, deltas = _rope_index(cfg, vc, i["input_ids"], i["image_grid_thw"], i["attention_mask"])
    np.testing.assert_array_equal(pos, i["position_ids"])
    np.testing.assert_array_equal(deltas, i["rope_deltas"])
    tc = cfg["text_config"]
    angles = positions.mrope_angles(pos, tc["head_dim"], tc["rope_theta"], tc["mrope_section"])
    emb = np.concatenate([angles, angles], -1)
    np.testing.assert_allclose(np.cos(emb), o["rope_cos"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.sin(emb), o["rope_sin"], rtol=0, atol=1e-6)
    assert positions.mrope_channels(16, (4, 2, 2)).tolist() == [0, 1, 2, 0, 1, 2, 0, 0]  # the README's j -> channel


def test_left_padded_rows_get_their_own_positions(fx):
    """Two rows, one left-padded, one image each: each row's positions equal those of the row alone; pads get 1."""
    cfg, vc, i, _ = fx
    ids = i["input_ids"][0]
    short = np.concatenate([ids[:1], ids[21:]])  # bos + the image block + the text after it
    batch = np.stack([ids, np.concatenate([np.zeros(20, np.int64), short])])
    mask = np.stack([np.ones_like(ids), np.concatenate([np.zeros(20, np.int64), np.ones_like(short)])])
    grid = np.concatenate([i["image_grid_thw"]] * 2)
    pos, deltas = _rope_index(cfg, vc, batch, grid, mask)
    alone, _ = _rope_index(cfg, vc, short[None], i["image_grid_thw"])
    np.testing.assert_array_equal(pos[:, 0], i["position_ids"][:, 0])
    np.testing.assert_array_equal(pos[:, 1, 20:], alone[:, 0])
    assert (pos[:, 1, :20] == 1).all() and deltas[1, 0] == alone.max() + 1 - 70


def _tower_params(vc, i):
    g = i["image_grid_thw"]
    inputs = (jnp.asarray(i["pixel_values"]), *positions.pos_embed_lookup(g, vc),
              positions.vision_rotary_angles(positions.rotary_positions(g, vc), vc.head_dim), positions.frame_ids(g))
    abstract = meta.unbox(jax.eval_shape(lambda: VisionTower(vc).init(jax.random.key(0), *inputs)))["params"]
    tensors = load_file(VL / "model.safetensors")
    flat = {p: jnp.asarray(names.to_flax(p, tensors[names.hf_name(p)])) for p in traverse_util.flatten_dict(abstract)}
    for p, a in traverse_util.flatten_dict(abstract).items():
        assert flat[p].shape == a.shape, p
    return traverse_util.unflatten_dict(flat), inputs, tensors


def test_vision_tower_blocks_and_mergers_match_the_official_model(fx):
    _, vc, i, o = fx
    params, inputs, tensors = _tower_params(vc, i)
    idx, w = inputs[1], inputs[2]
    pos_embeds = np.sum(tensors["model.visual.pos_embed.weight"][idx] * w[..., None], axis=1)
    np.testing.assert_allclose(pos_embeds, o["vision_pos_embeds"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(inputs[3], o["vision_rotary_freqs"], rtol=0, atol=1e-6)
    image, deep, hidden = VisionTower(vc).apply({"params": params}, *inputs)
    for b in range(vc.depth + 1):
        np.testing.assert_allclose(np.asarray(hidden[b]), o["vision_hidden_states"][b], rtol=0, atol=1e-5)
    np.testing.assert_allclose(np.asarray(image), o["image_embeds"], rtol=0, atol=1e-5)
    np.testing.assert_allclose(np.asarray(deep), o["deepstack_embeds"], rtol=0, atol=1e-5)
    for p, value in traverse_util.flatten_dict(params).items():  # the name map round-trips to the HF tensors
        hf = tensors[names.hf_name(p)]
        np.testing.assert_array_equal(names.to_hf(p, np.asarray(value), hf.shape), hf)


def test_images_from_two_frames_never_attend_to_each_other(fx):
    """Two images in one call give each the result it gets alone (attention stays inside a frame)."""
    _, vc, i, _ = fx
    params, _, _ = _tower_params(vc, i)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (32, 48, 3), dtype=np.uint8), i["image_0"]]

    def run(ims):
        rows, g = patchify_images(ims, vc)
        inputs = (jnp.asarray(rows), *positions.pos_embed_lookup(g, vc),
                  positions.vision_rotary_angles(positions.rotary_positions(g, vc), vc.head_dim),
                  positions.frame_ids(g))
        return VisionTower(vc).apply({"params": params}, *inputs)[0]

    both = np.asarray(run(images))
    np.testing.assert_allclose(both[:6], np.asarray(run(images[:1])), rtol=0, atol=1e-5)
    np.testing.assert_allclose(both[6:], np.asarray(run(images[1:])), rtol=0, atol=1e-5)


def test_smart_resize_rule():
    # 48 x 64 = 3072 < min_pixels 3136: scaled by sqrt(3136 / 3072) = 1.0104 and rounded UP to multiples of 16:
    # ceil(48.5 / 16) * 16 = 64, ceil(64.7 / 16) * 16 = 80
    assert smart_resize(48, 64, 16) == (64, 80)
    h, w = smart_resize(1000, 3000, 32, max_pixels=1024 * 1024)
    assert h % 32 == 0 and w % 32 == 0 and h * w <= 1024 * 1024 and abs(w / h - 3) < 0.2
    assert smart_resize(320, 480, 32, min_pixels=0, max_pixels=10 ** 9) == (320, 480)


def test_bad_images_and_prompts_give_clear_errors(fx):
    cfg, vc, i, _ = fx
    with pytest.raises(ValueError, match="smaller than one merged patch"):
        patchify(np.zeros((8, 64, 3), np.uint8), vc)
    with pytest.raises(ValueError, match="multiples of patch_size x spatial_merge_size = 16"):
        patchify(np.zeros((40, 64, 3), np.uint8), vc)
    with pytest.raises(ValueError, match="uint8"):
        patchify(np.zeros((48, 64, 3), np.float32), vc)
    with pytest.raises(ValueError, match=r"rows must be 384 wide"):
        VisionTower(vc).init(jax.random.key(0), jnp.zeros((48, 383)), *(jnp.zeros((48, 4), jnp.int32),) * 2,
                             jnp.zeros((48, 8)), jnp.zeros((48,), jnp.int32))
    ids = i["input_ids"].copy()
    ids[0, 25] = 7  # one <|image_pad|> fewer than the grid's 12
    with pytest.raises(ValueError, match="needs exactly 12 <|image_pad|> tokens"):
        _rope_index(cfg, vc, ids, i["image_grid_thw"])
    with pytest.raises(ValueError, match="image_grid_thw has 2 images but the prompts hold 1"):
        _rope_index(cfg, vc, i["input_ids"], np.concatenate([i["image_grid_thw"]] * 2))
    with pytest.raises(ValueError, match="vision_config.num_heads"):
        VisionConfig(hidden_size=30, num_heads=3)
