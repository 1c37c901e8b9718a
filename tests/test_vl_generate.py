"""Cached decoding of SpB2.0-VL: an image prefill plus teacher-forced decode steps equal the no-cache forward, and a
left-padded batch with a different image per row gives each row its own result (tiny-vl fixture weights)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from spb2_jax.checkpoint.vl import load_vl
from spb2_jax.generate.vl import generate_vl, vl_decode_step, vl_prefill
from spb2_jax.layers.cache import init_cache
from spb2_jax.options import resolve_options
from spb2_jax.vision.preprocess import patchify
from spb2_jax.vl_api import VLModel
from tests.helpers import SHARED

VL = SHARED / "fixtures" / "official-vl" / "tiny-vl"


@pytest.fixture(scope="module")
def vl():
    if not (VL / "outputs.npz").is_file():
        raise FileNotFoundError(f"VL fixture not found at {VL}: the tests need ../shared beside the repository")
    config, params = load_vl(VL, progress=False)
    options = resolve_options(config.text, official_qk_bf16=False)
    return VLModel(config, options, params), np.load(VL / "inputs.npz")


def test_image_prefill_then_cached_decode_equals_the_forward(vl):
    model, i = vl
    rng = np.random.default_rng(0)
    extra = rng.integers(3, 380, (1, 5))
    ids = np.concatenate([i["input_ids"], extra], axis=1)  # the image prompt and 5 more text tokens
    kw = dict(pixel_values=i["pixel_values"], image_grid_thw=i["image_grid_thw"])
    want = np.asarray(model(ids, **kw).logits)[0]  # no cache, M-RoPE positions of the whole sequence
    scale = np.abs(want).max()
    cache = init_cache(model.config.text, 1, ids.shape[1], jnp.float32)
    logits, cache, delta = vl_prefill(model.params, model.config, i["input_ids"], cache, **kw,
                                      options=model.options, all_logits=True)
    np.testing.assert_allclose(np.asarray(logits)[0], want[:70], rtol=0, atol=1e-5 * scale)
    for t in range(5):
        logits, cache = vl_decode_step(model.params, model.config, extra[:, t:t + 1], cache, delta,
                                       options=model.options)
        np.testing.assert_allclose(np.asarray(logits)[0, 0], want[70 + t], rtol=0, atol=1e-5 * scale,
                                   err_msg=f"decode step {t}")


def _two_rows(model, i):
    """Row 0: the fixture prompt (70 tokens, one 48 x 64 image); row 1: a shorter prompt with another image
    (32 x 48: 6 image tokens), left-padded."""
    config = model.config
    other, grid = patchify(np.random.default_rng(1).integers(0, 256, (32, 48, 3), dtype=np.uint8), config.vision)
    n = int(np.prod(grid)) // 4
    short = [1, 40, 41, config.vision_start_token_id] + [config.image_token_id] * n + [
        config.vision_end_token_id, 42, 43, 44]
    long = i["input_ids"][0].tolist()
    pad = len(long) - len(short)
    ids = np.asarray([long, [0] * pad + short])
    mask = np.asarray([[1] * len(long), [0] * pad + [1] * len(short)])
    return dict(ids=ids, mask=mask, pad=pad, short=np.asarray([short]), other=other, grid=grid[None],
                pixels=np.concatenate([i["pixel_values"], other]),
                grids=np.concatenate([i["image_grid_thw"], grid[None]]))


def test_left_padded_batch_with_a_different_image_per_row(vl):
    model, i = vl
    r = _two_rows(model, i)
    both = np.asarray(model(r["ids"], r["mask"], pixel_values=r["pixels"], image_grid_thw=r["grids"]).logits)
    alone0 = np.asarray(model(r["ids"][:1], pixel_values=i["pixel_values"], image_grid_thw=i["image_grid_thw"]).logits)
    alone1 = np.asarray(model(r["short"], pixel_values=r["other"], image_grid_thw=r["grid"]).logits)
    scale = np.abs(alone0).max()
    np.testing.assert_allclose(both[0], alone0[0], rtol=0, atol=1e-5 * scale)
    np.testing.assert_allclose(both[1, r["pad"]:], alone1[0], rtol=0, atol=1e-5 * scale)


@pytest.mark.slow  # three generation runs, each compiling a prefill and a decode step (~30 s)
def test_generated_tokens_of_a_left_padded_batch_equal_each_row_alone(vl):
    model, i = vl
    r = _two_rows(model, i)
    run = dict(options=model.options, max_new_tokens=4)
    batch = generate_vl(model.params, model.config, r["ids"], r["mask"], pixel_values=r["pixels"],
                        image_grid_thw=r["grids"], **run)
    assert batch[0] == generate_vl(model.params, model.config, r["ids"][:1], pixel_values=i["pixel_values"],
                                   image_grid_thw=i["image_grid_thw"], **run)[0]
    assert batch[1] == generate_vl(model.params, model.config, r["short"], pixel_values=r["other"],
                                   image_grid_thw=r["grid"], **run)[0]


def _vl_tokenizer(path):
    """A byte-level BPE of 390 tokens plus the VL special tokens at the fixture's ids (390 <|vision_start|>,
    391 <|vision_end|>, 393 <|image_pad|>) and the ChatML turn tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = (SHARED / "DESIGN.md").read_text() if (SHARED / "DESIGN.md").is_file() else "hello world " * 500
    tok.train_from_iterator([text], trainers.BpeTrainer(vocab_size=390, show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.add_tokens([f"<unused_{k}>" for k in range(390 - tok.get_vocab_size())])
    tok.add_special_tokens(["<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>",
                            "<|video_pad|>", "<|im_start|>", "<|im_end|>"])
    assert tok.token_to_id("<|vision_start|>") == 390 and tok.token_to_id("<|image_pad|>") == 393
    tok.save(str(path))
    return tok


def test_generate_cli_with_an_image(tmp_path, vl, capsys):
    """``python -m spb2_jax.generate --checkpoint VL --image PATH --prompt ... --chat``: the prompt holds one
    vision block of 12 image tokens (48 x 64 pixels, patch 8, merge 2) inside the ChatML turn, and the tokens
    equal ``generate_vl`` on that prompt."""
    import shutil

    from PIL import Image

    from spb2_jax.generate.__main__ import main
    from spb2_jax.vision.prompt import encode_vl_prompt

    model, i = vl
    ckpt = tmp_path / "vl"
    ckpt.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(VL / name, ckpt / name)
    tok = _vl_tokenizer(ckpt / "tokenizer.json")
    Image.fromarray(i["image_0"]).save(tmp_path / "image.png")
    stats = main(["--checkpoint", str(ckpt), "--image", str(tmp_path / "image.png"), "--prompt", "what is it",
                  "--chat", "--max-new-tokens", "3", "--float32-qk"])
    prompt = encode_vl_prompt(tok, "what is it", i["image_grid_thw"], model.config, chat=True)
    assert prompt.count(393) == 12 and prompt[prompt.index(390) + 1:prompt.index(391)] == [393] * 12
    assert tok.decode(prompt, skip_special_tokens=False).startswith("<|im_start|>user\n<|vision_start|><|image_pad|>")
    assert stats["prompt_tokens"] == len(prompt)
    want = generate_vl(model.params, model.config, np.asarray([prompt]), pixel_values=i["pixel_values"],
                       image_grid_thw=i["image_grid_thw"], options=model.options, max_new_tokens=3,
                       stop_tokens=(2, tok.token_to_id("<|im_end|>")))[0]
    assert stats["tokens"] == want
    assert capsys.readouterr().out.strip() == tok.decode(want, skip_special_tokens=True).strip()
