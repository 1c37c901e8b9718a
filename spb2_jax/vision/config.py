"""The vision tower's config (HF ``vision_config`` of an ``spb2_vl`` checkpoint) and the whole VL config."""

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


@dataclasses.dataclass(frozen=True)
class VLConfig:
    """An ``spb2_vl`` checkpoint's config: the hybrid text stack (``text``, with ``mrope_section``), the vision
    tower (``vision``) and the special tokens. ``raw``: the config.json dict it came from (written back on
    export)."""

    text: Any
    vision: VisionConfig
    image_token_id: int
    vision_start_token_id: int
    vision_end_token_id: int
    video_token_id: int | None = None
    raw: Mapping[str, Any] = dataclasses.field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self):
        if self.vision.out_hidden_size != self.text.hidden_size:
            raise ValueError(f"vision_config.out_hidden_size={self.vision.out_hidden_size} != "
                             f"text_config.hidden_size={self.text.hidden_size}")
        for name in ("image_token_id", "vision_start_token_id", "vision_end_token_id"):
            v = getattr(self, name)
            if not isinstance(v, int) or not 0 <= v < self.text.vocab_size:
                raise ValueError(f"{name}={v!r} must be a token id below vocab_size={self.text.vocab_size}")

    @property
    def num_deepstack(self) -> int:
        return len(self.vision.deepstack_visual_indexes)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "VLConfig":
        """From a VL ``config.json`` dict (``model_type == "spb2_vl"``; errors name the field)."""
        from spb2_jax.checkpoint.vl import vl_text_config

        if not isinstance(d.get("vision_config"), Mapping):
            raise ValueError("vision_config is required in a VL config.json")
        for name in ("image_token_id", "vision_start_token_id", "vision_end_token_id"):
            if name not in d:
                raise ValueError(f"{name} is required in a VL config.json")
        return cls(text=vl_text_config(d), vision=VisionConfig.from_dict(d["vision_config"]),
                   image_token_id=d["image_token_id"], vision_start_token_id=d["vision_start_token_id"],
                   vision_end_token_id=d["vision_end_token_id"], video_token_id=d.get("video_token_id"), raw=dict(d))

    def to_dict(self) -> dict[str, Any]:
        """The VL ``config.json`` dict (the one read, when there was one)."""
        if self.raw:
            return dict(self.raw)
        text = self.text.to_dict()
        text["model_type"] = "spb2_vl_text"
        return {"architectures": ["SPB2VLForConditionalGeneration"], "model_type": "spb2_vl",
                "text_config": text, "vision_config": self.vision.to_dict(),
                "image_token_id": self.image_token_id, "video_token_id": self.video_token_id,
                "vision_start_token_id": self.vision_start_token_id, "vision_end_token_id": self.vision_end_token_id,
                "tie_word_embeddings": self.text.tie_word_embeddings}
