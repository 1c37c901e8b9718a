"""Vision-tower param paths <-> official HF tensor names (``model.visual.*``), both directions.

Flax path (under the VL params' ``visual``)            HF tensor (``model.visual.`` + ...)
``patch_embed_proj/kernel [C*tp*P*P, D]``               ``patch_embed.proj.weight [D, C, tp, P, P]`` (flattened, T)
``pos_embed [S*S, D]``                                  ``pos_embed.weight``
``blocks_{i}/{norm1,norm2}/{scale,bias}``               ``blocks.{i}.{norm1,norm2}.{weight,bias}``
``blocks_{i}/attn/{qkv,proj}/{kernel,bias}``            ``blocks.{i}.attn.{qkv,proj}.{weight (T),bias}``
``blocks_{i}/mlp/linear_fc{1,2}/...``                   ``blocks.{i}.mlp.linear_fc{1,2}...``
``merger/...``, ``deepstack_merger_list_{k}/...``       ``merger...``, ``deepstack_merger_list.{k}...``
"""

from __future__ import annotations

import re

import numpy as np

PREFIX = "model.visual."
_LEAF = {"kernel": "weight", "scale": "weight", "bias": "bias"}


def hf_name(path: tuple[str, ...]) -> str:
    """The HF tensor name of a vision param path (module docstring)."""
    if path == ("pos_embed",):
        return PREFIX + "pos_embed.weight"
    if path[0] == "patch_embed_proj":
        return PREFIX + "patch_embed.proj." + _LEAF[path[-1]]
    mods = [re.sub(r"^(blocks|deepstack_merger_list)_(\d+)$", r"\1.\2", p) for p in path[:-1]]
    return PREFIX + ".".join(mods) + "." + _LEAF[path[-1]]


def to_flax(path: tuple[str, ...], tensor: np.ndarray) -> np.ndarray:
    """An HF tensor in the layout of the Flax param at ``path``."""
    if path[-1] != "kernel":
        return tensor
    if path[0] == "patch_embed_proj":
        return tensor.reshape(tensor.shape[0], -1).T
    return tensor.T


def to_hf(path: tuple[str, ...], value: np.ndarray, conv_shape: tuple[int, ...] | None = None) -> np.ndarray:
    """A Flax param in HF layout; the patch embedding needs ``conv_shape`` ``(D, C, tp, P, P)``."""
    if path[-1] != "kernel":
        return value
    if path[0] == "patch_embed_proj":
        return value.T.reshape(conv_shape)
    return value.T
