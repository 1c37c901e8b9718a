"""spb2_jax: SpikingBrain2.0 (hybrid MoBA / SWA / SSE linear-attention LLM) in JAX/Flax.

Notebook use::

    import spb2_jax as spb2
    model = spb2.load_pretrained("path/to/checkpoint", dtype="bfloat16")   # or None: the embedded tiny model
    out = model(input_ids)                    # CausalLMOutput: .logits [B, T, V], .aux_losses, ...
    texts = model.generate(["Once upon a time"], max_new_tokens=32)
"""

from spb2_jax import _xla_cpu

_xla_cpu.apply()  # before any backend starts: see spb2_jax/_xla_cpu.py

from spb2_jax.api import Model, load_pretrained  # noqa: E402
from spb2_jax.checkpoint import load_hf, save_hf  # noqa: E402
from spb2_jax.config import SpB2Config  # noqa: E402
from spb2_jax.generate import decode_step, generate, init_cache, prefill  # noqa: E402
from spb2_jax.loss import causal_lm_loss_tiled  # noqa: E402
from spb2_jax.model import CausalLMOutput, SpB2ForCausalLM, causal_lm_loss, init_params, logical_axes, loss_fn  # noqa: E402
from spb2_jax.ops.segments import Segments  # noqa: E402
from spb2_jax.options import Kernels, ModelOptions, resolve_options  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "CausalLMOutput", "Kernels", "Model", "ModelOptions", "Segments", "SpB2Config", "SpB2ForCausalLM",
    "causal_lm_loss", "causal_lm_loss_tiled", "decode_step", "generate", "init_cache", "init_params", "load_hf",
    "load_pretrained", "logical_axes", "loss_fn", "prefill", "resolve_options", "save_hf",
]
