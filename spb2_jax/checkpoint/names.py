"""The mechanical name mapping between Flax param paths and HF tensor names.

- path components: a trailing ``_<int>`` suffix chain is an HF module index:
  ``layers_3`` <-> ``layers.3``, ``lora_q_proj_0`` <-> ``lora_q_proj.0``, ``sse_gk_proj_0_1`` <-> ``sse_gk_proj.0.1``;
- leaves: ``kernel`` <-> ``weight`` (transposed), ``embedding`` <-> ``weight``, ``scale`` <-> ``weight``;
  ``bias``, ``A_log``, ``dt_bias`` keep their names.
"""

from __future__ import annotations

import re

_INDEXED = re.compile(r"^(.*?)((?:_\d+)+)$")
_LEAF_TO_HF = {"kernel": "weight", "embedding": "weight", "scale": "weight"}


def flax_path_to_hf(path: tuple[str, ...]) -> tuple[str, bool]:
    """``('model', 'layers_3', 'attn', 'q_proj', 'kernel')`` -> ``('model.layers.3.attn.q_proj.weight', True)``;
    the flag says whether the tensor is transposed between the two forms (linear kernels)."""
    *modules, leaf = path
    parts = []
    for m in modules:
        match = _INDEXED.match(m)
        if match:
            parts.append(match.group(1))
            parts.extend(match.group(2).lstrip("_").split("_"))
        else:
            parts.append(m)
    parts.append(_LEAF_TO_HF.get(leaf, leaf))
    return ".".join(parts), leaf == "kernel"


def hf_shape(flax_shape: tuple[int, ...], transposed: bool) -> tuple[int, ...]:
    """The HF tensor shape of a Flax leaf."""
    return tuple(reversed(flax_shape)) if transposed else tuple(flax_shape)
