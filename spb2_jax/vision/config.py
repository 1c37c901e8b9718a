"""The vision tower's config (HF ``vision_config`` of an ``spb2_vl`` checkpoint)."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

ACTIVATIONS = ("gelu_pytorch_tanh",)


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """Qwen3-VL-style vision tower: ``depth`` pre-LayerNorm blocks of width ``hidden_size`` over Conv3d patches
    (``temporal_patch_size x patch_size x patch_size``), a learned ``sqrt(num_position_embeddings)``-square
    position grid, 2x2 (``spatial_merge_size``) patch mergers to ``out_hidden_size`` (the text width), and one
    deepstack merger per index in ``deepstack_visual_indexes``."""

    depth: int = 27
    hidden_size: int = 1152
    num_heads: int = 16
    intermediate_size: int = 4304
    patch_size: int = 16
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    in_channels: int = 3
    num_position_embeddings: int = 2304
    out_hidden_size: int = 2048
    deepstack_visual_indexes: tuple[int, ...] = (8, 16, 24)
    hidden_act: str = "gelu_pytorch_tanh"
    initializer_range: float = 0.02

    def __post_init__(self):
        def need(ok, field, why):
            if not ok:
                raise ValueError(f"vision_config.{field}={getattr(self, field)!r}: {why}")

        for f in ("depth", "hidden_size", "num_heads", "intermediate_size", "patch_size", "temporal_patch_size",
                  "spatial_merge_size", "in_channels", "num_position_embeddings", "out_hidden_size"):
            need(isinstance(getattr(self, f), int) and getattr(self, f) > 0, f, "must be a positive integer")
        need(self.hidden_size % self.num_heads == 0, "hidden_size", f"not a multiple of num_heads={self.num_heads}")
        need((self.hidden_size // self.num_heads) % 4 == 0, "num_heads", "head_dim must be a multiple of 4 "
             "(2-D rotary over row and column halves)")
        side = int(round(self.num_position_embeddings ** 0.5))
        need(side * side == self.num_position_embeddings, "num_position_embeddings", "must be a square grid")
        need(all(0 <= i < self.depth for i in self.deepstack_visual_indexes), "deepstack_visual_indexes",
             f"every index must lie in [0, depth={self.depth})")
        need(self.hidden_act in ACTIVATIONS, "hidden_act", f"must be one of {ACTIVATIONS}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def grid_side(self) -> int:
        """Side of the learned position grid."""
        return int(round(self.num_position_embeddings ** 0.5))

    @property
    def patch_dim(self) -> int:
        """Width of one ``pixel_values`` row: ``in_channels * temporal_patch_size * patch_size**2``."""
        return self.in_channels * self.temporal_patch_size * self.patch_size ** 2

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "VisionConfig":
        """From an HF ``vision_config`` dict (unknown keys such as ``model_type`` ignored)."""
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        if "deepstack_visual_indexes" in kw:
            kw["deepstack_visual_indexes"] = tuple(kw["deepstack_visual_indexes"])
        return cls(**kw)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["deepstack_visual_indexes"] = list(self.deepstack_visual_indexes)
        d["model_type"] = "spb2_vl"
        return d
