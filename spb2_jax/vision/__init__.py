"""The vision side of SpB2.0-VL (official ``spb2vl``): config, image preprocessing, host-side positions
(vision grid lookups, the text M-RoPE ``get_rope_index``), the vision tower and its HF names."""

from spb2_jax.vision.config import VisionConfig
from spb2_jax.vision.positions import get_rope_index, mrope_angles
from spb2_jax.vision.preprocess import patchify, patchify_images, smart_resize
from spb2_jax.vision.tower import VisionTower

__all__ = ["VisionConfig", "VisionTower", "get_rope_index", "mrope_angles", "patchify", "patchify_images",
           "smart_resize"]
