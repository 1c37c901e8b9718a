"""VL prompts as the official processor builds them: one ``<|vision_start|><|image_pad|><|vision_end|>`` block per
image (before the text, as the official example), the Qwen ChatML turn around it with ``chat``, and each
``<|image_pad|>`` expanded to the image's ``t * (h / m) * (w / m)`` tokens."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from spb2_jax.generate.tokenizer import chat_prompt

VISION_START, IMAGE_PAD, VISION_END = "<|vision_start|>", "<|image_pad|>", "<|vision_end|>"


def vl_prompt_text(text: str, num_images: int, *, chat: bool = False, system: str | None = None) -> str:
    """The prompt text with ``num_images`` single-token image blocks (expanded by ``expand_image_tokens``)."""
    body = f"{VISION_START}{IMAGE_PAD}{VISION_END}\n" * num_images + text
    return chat_prompt(body, system) if chat else body


def expand_image_tokens(ids: Sequence[int], image_grid_thw, *, image_token_id: int,
                        spatial_merge_size: int) -> list[int]:
    """Each ``image_token_id`` of ``ids`` (one per image, in order) repeated ``t h w / m^2`` times."""
    grids = np.asarray(image_grid_thw, np.int64).reshape(-1, 3)
    pads = [k for k, t in enumerate(ids) if t == image_token_id]
    if len(pads) != len(grids):
        raise ValueError(f"the prompt has {len(pads)} {IMAGE_PAD} tokens but {len(grids)} images were given")
    out: list[int] = []
    image = 0
    for t in ids:
        if t == image_token_id:
            out += [image_token_id] * int(np.prod(grids[image]) // spatial_merge_size ** 2)
            image += 1
        else:
            out.append(int(t))
    return out


def encode_vl_prompt(tokenizer, text: str, image_grid_thw, config, *, chat: bool = False,
                     system: str | None = None) -> list[int]:
    """Token ids of a VL prompt for images of ``image_grid_thw`` (``config``: the ``VLConfig``)."""
    grids = np.asarray(image_grid_thw, np.int64).reshape(-1, 3)
    for name, token, want in ((VISION_START, VISION_START, config.vision_start_token_id),
                              (IMAGE_PAD, IMAGE_PAD, config.image_token_id),
                              (VISION_END, VISION_END, config.vision_end_token_id)):
        got = tokenizer.token_to_id(token)
        if got != want:
            raise ValueError(f"the tokenizer maps {name} to {got}, the config to {want}: tokenizer.json and "
                             f"config.json do not belong together")
    ids = tokenizer.encode(vl_prompt_text(text, len(grids), chat=chat, system=system), add_special_tokens=False).ids
    return expand_image_tokens(ids, grids, image_token_id=config.image_token_id,
                               spatial_merge_size=config.vision.spatial_merge_size)
