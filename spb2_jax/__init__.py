"""spb2_jax: SpikingBrain2.0 (hybrid MoBA / SWA / SSE linear-attention LLM) in JAX/Flax.

Notebook use::

    import spb2_jax as spb2
    model = spb2.load_pretrained("path/to/checkpoint", dtype="bfloat16")   # or None: the embedded tiny model
    out = model(input_ids)                    # CausalLMOutput: .logits [B, T, V], .aux_losses, ...
    texts = model.generate(["Once upon a time"], max_new_tokens=32)

    vl = spb2.load_pretrained("path/to/SpB2.0-VL")   # a VLModel: vl(ids, pixel_values=..., image_grid_thw=...)
"""

from spb2_jax.api import Model, load_pretrained
from spb2_jax.checkpoint import load_hf, load_qwen3, save_hf, save_qwen3
from spb2_jax.config import SpB2Config
from spb2_jax.generate import decode_step, generate, init_cache, prefill
from spb2_jax.loss import causal_lm_loss_tiled
from spb2_jax.model import CausalLMOutput, SpB2ForCausalLM, causal_lm_loss, init_params, logical_axes, loss_fn
from spb2_jax.ops.segments import Segments
from spb2_jax.options import Kernels, ModelOptions, resolve_options
from spb2_jax.vision.config import VLConfig
from spb2_jax.checkpoint.vl import load_vl, save_vl
from spb2_jax.vl_api import VLModel
from spb2_jax.vl_model import SpB2VLForConditionalGeneration, VLOutput, prepare_vl_inputs

__version__ = "0.1.0"

__all__ = [
    "CausalLMOutput", "Kernels", "Model", "ModelOptions", "Segments", "SpB2Config", "SpB2ForCausalLM",
    "causal_lm_loss", "causal_lm_loss_tiled", "decode_step", "generate", "init_cache", "init_params", "load_hf",
    "load_pretrained", "load_qwen3", "logical_axes", "loss_fn", "prefill", "resolve_options", "save_hf", "save_qwen3",
    "SpB2VLForConditionalGeneration", "VLConfig", "VLModel", "VLOutput", "load_vl", "prepare_vl_inputs", "save_vl",
]
