"""The notebook API: ``model = spb2.load_pretrained(path)``, ``model(input_ids)``, ``model.generate(prompts)``.

``load_pretrained`` reads an HF checkpoint directory (``config.json``, safetensors, optional ``tokenizer.json``),
resolves the ``ModelOptions`` once (``spb2_jax.options.resolve_options``) and returns a ``Model`` handle; the
lower-level functions (``load_hf``, ``SpB2ForCausalLM``, ``prefill`` / ``decode_step`` / ``generate``) stay
available for programs that manage params and caches themselves.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Sequence

import jax
import numpy as np

from spb2_jax.checkpoint.auto import config_of, load_checkpoint
from spb2_jax.checkpoint.qwen3 import checkpoint_model_type
from spb2_jax.checkpoint.vl import VL_MODEL_TYPE
from spb2_jax.config import SpB2Config
from spb2_jax.generate.loop import generate as generate_ids
from spb2_jax.generate.tokenizer import load_tokenizer
from spb2_jax.model import CausalLMOutput, SpB2ForCausalLM
from spb2_jax.options import ModelOptions, resolve_options
from spb2_jax.parallel.mesh import check_batch, sequence_shards, token_sharding
from spb2_jax.parallel.placement import param_shardings
from spb2_jax.parallel.rules import use_rules

EMBEDDED_TINY = os.path.join(os.path.dirname(__file__), "assets", "tiny")


def checked_input_ids(input_ids: Any, vocab_size: int) -> np.ndarray:
    """``input_ids`` as a ``[batch, time]`` integer array (a 1-D sequence becomes one row); a ValueError naming
    the shape, dtype or the out-of-range ids otherwise."""
    ids = np.asarray(input_ids)
    if ids.ndim == 1:
        ids = ids[None]
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"input_ids must be integer token ids [batch, time], got shape {ids.shape} "
                         f"dtype {ids.dtype}")
    bad = ids[(ids < 0) | (ids >= vocab_size)]
    if bad.size:
        raise ValueError(f"input_ids contain ids {sorted(set(bad.tolist()))[:8]} outside [0, vocab_size={vocab_size})")
    return ids


@dataclasses.dataclass(frozen=True, eq=False)
class Model:
    """A loaded model: ``config``, ``options`` (how it runs), ``params`` (a pytree of arrays) and the checkpoint's
    ``tokenizer`` (a ``tokenizers.Tokenizer``, or None when the checkpoint has no ``tokenizer.json``) and the
    ``mesh`` it is sharded over (None: one device)."""

    config: SpB2Config
    options: ModelOptions
    params: Any
    tokenizer: Any = None
    mesh: Any = None

    @property
    def module(self) -> SpB2ForCausalLM:
        """The Flax module (``module.apply({"params": model.params}, ...)`` for anything not wrapped here)."""
        return SpB2ForCausalLM(self.config, self.options)

    def __call__(self, input_ids: Any, attention_mask: Any = None, *, segment_ids: Any = None,
                 output_hidden_states: bool = False) -> CausalLMOutput:
        """Forward pass (compiled once per shape): ``input_ids [B, T]`` -> ``CausalLMOutput`` (``.logits``
        ``[B, T, V]``, ``.aux_losses``, and with ``output_hidden_states`` the per-layer hidden states).

        ``attention_mask [B, T]``: HF left/right padding (0 = pad); ``segment_ids [B, T]``: packed sequences
        (0 = padding), tokens never mix across segments."""
        ids = checked_input_ids(input_ids, self.config.vocab_size)
        as_int = lambda x: None if x is None else np.asarray(x).astype(np.int32)  # noqa: E731
        mask, seg = as_int(attention_mask), as_int(segment_ids)
        for name, x in (("attention_mask", mask), ("segment_ids", seg)):
            if x is not None and x.shape != ids.shape:
                raise ValueError(f"{name} shape {x.shape} != input_ids shape {ids.shape}")
        if self.mesh is None:
            return _apply(self.params, ids.astype(np.int32), mask, seg, config=self.config, options=self.options,
                          output_hidden_states=output_hidden_states)
        return self._apply_sharded(ids.astype(np.int32), mask, seg, output_hidden_states)

    def _apply_sharded(self, ids, mask, seg, output_hidden_states):
        """Inputs padded at the end to a multiple of the sequence shards (padding tokens: mask / segment id 0),
        placed ``[data x fsdp, sequence]``, the forward run under the mesh's rules, the padding cut off.

        Multi-host (a mesh over several processes, ``spb2_jax.parallel.initialize_distributed``): every process
        calls the model with the same full batch ``[B, T]``, as every process reads the same checkpoint in
        ``load_pretrained``; each process places only the slices its own devices hold
        (``jax.make_array_from_callback``, no communication; the processes' inputs are not compared). The
        outputs are global ``jax.Array`` s that no process holds whole: gather them with
        ``jax.experimental.multihost_utils.process_allgather(out.logits, tiled=True)``."""
        check_batch(self.mesh, ids.shape[0])
        T = ids.shape[1]
        extra = (-T) % sequence_shards(self.mesh)
        if extra:
            if mask is None and seg is None:
                mask = np.ones_like(ids)
            pad = lambda x: None if x is None else np.pad(x, ((0, 0), (0, extra)))  # noqa: E731
            ids, mask, seg = pad(ids), pad(mask), pad(seg)
        place = functools.partial(_place_tokens, sharding=token_sharding(self.mesh))
        with use_rules(self.mesh):
            out = _apply(self.params, place(ids), place(mask), place(seg), config=self.config,
                         options=self.options, output_hidden_states=output_hidden_states)
        if not extra:
            return out
        return jax.tree.map(lambda x: x[:, :T] if getattr(x, "ndim", 0) >= 2 and x.shape[1] == T + extra else x,
                            out)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (needs the checkpoint's tokenizer)."""
        return self._need_tokenizer().encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of token ids (special tokens skipped; needs the checkpoint's tokenizer)."""
        return self._need_tokenizer().decode([int(i) for i in ids], skip_special_tokens=True)

    def generate(self, prompts: str | Sequence[str] | Sequence[Sequence[int]], *, max_new_tokens: int = 32,
                 temperature: float = 0.0, top_k: int | None = None, top_p: float = 1.0, seed: int = 0,
                 stop_tokens: Sequence[int] | int | None = None) -> list[str] | list[list[int]]:
        """Continue each prompt with the cached sampling loop (``spb2_jax.generate.generate``).

        ``prompts``: a string, a list of strings (encoded with the checkpoint's tokenizer) or a list of token-id
        lists. Returns one continuation per prompt: text for text prompts (they need the checkpoint's tokenizer),
        token ids for id prompts. ``temperature=0`` is greedy; the rest as in ``spb2_jax.generate.generate``.
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        if not prompts:
            raise ValueError("prompts is empty: give a string, a list of strings or a list of token-id lists")
        as_text = all(isinstance(p, str) for p in prompts)
        if not as_text and any(isinstance(p, str) for p in prompts):
            raise ValueError("prompts mixes strings and token-id lists; give one kind")
        rows = [self.encode(p) for p in prompts] if as_text else [[int(t) for t in p] for p in prompts]
        run = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                   stop_tokens=stop_tokens, options=self.options)
        if self.mesh is None:
            out = generate_ids(self.params, self.config, rows, **run)
        else:  # sequence-sharded prefill; the K/V caches stay sharded along the sequence while decoding
            with use_rules(self.mesh):
                out = generate_ids(self.params, self.config, rows, **run)
        seqs = out.sequences()
        return [self.decode(s) for s in seqs] if as_text else seqs

    def _need_tokenizer(self):
        if self.tokenizer is None:
            raise ValueError("this checkpoint has no tokenizer.json: pass token ids instead of text")
        return self.tokenizer


def _place_tokens(x: np.ndarray | None, sharding: jax.sharding.Sharding) -> jax.Array | None:
    """A host ``[B, T]`` array (the same on every process) as a global array: each process copies only the
    slices of its own devices."""
    return None if x is None else jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


@functools.partial(jax.jit, static_argnames=("config", "options", "output_hidden_states"))
def _apply(params, ids, mask, seg, *, config, options, output_hidden_states):
    return SpB2ForCausalLM(config, options).apply({"params": params}, ids, mask, segment_ids=seg,
                                                  output_hidden_states=output_hidden_states)


def load_pretrained(path: str | os.PathLike | None = None, *, dtype: Any = None, impl: str | None = None,
                    options: ModelOptions | None = None, strict: bool = True, mesh: Any = None,
                    progress: bool = True, **option_kwargs) -> Model:
    """Load an HF checkpoint directory into a ``Model`` handle.

    Args:
      path: directory with ``config.json`` and the safetensors (sharded or not) and, optionally,
        ``tokenizer.json``. None: the tiny official-format model embedded in the package. A Qwen3 checkpoint
        (``model_type == "qwen3"``) loads as the equal all-full-attention model (``load_qwen3``); a SpB2.0-VL
        checkpoint (``model_type == "spb2_vl"``) returns a ``spb2_jax.vl_api.VLModel`` (its option
        ``official_qk_bf16=False`` selects the pure-float32 mode).
      dtype: compute dtype, also the dtype the weights are loaded in (``"bfloat16"`` for the 5B); default
        float32.
      impl: ``"xla"`` (default), ``"pallas"`` or ``"reference"`` (``spb2_jax.options``).
      options: a ready ``ModelOptions`` instead of ``dtype`` / ``impl`` / ``option_kwargs``.
      strict: every checkpoint tensor must be used (``load_hf``).
      mesh: a ``spb2_jax.parallel.make_mesh`` mesh: each tensor is placed on its shards as it is read (logical
        rules), and with a ``sequence`` axis > 1 the token mixers run sequence-parallel; ``model(...)`` then
        shards its inputs ``[data x fsdp, sequence]``.
      progress: a progress bar over the tensors read (SpB2 / Qwen3 checkpoints).
      option_kwargs: more ``resolve_options`` arguments (``remat``, ``moba_decode``, ``block_size``...).
    """
    path = EMBEDDED_TINY if path is None else os.fspath(path)
    if os.path.isdir(path) and checkpoint_model_type(path) == VL_MODEL_TYPE:  # SpB2.0-VL: spb2_jax.vl_api
        from spb2_jax.vl_api import load_vl_pretrained

        return load_vl_pretrained(path, dtype=dtype, impl=impl, options=options, strict=strict, mesh=mesh,
                                  **option_kwargs)
    if options is not None and (dtype is not None or impl is not None or option_kwargs):
        raise ValueError("pass either options= or dtype= / impl= / option keywords, not both")
    config = config_of(path)
    if options is None:
        options = resolve_options(config, dtype=dtype, impl=impl, mesh=mesh, **option_kwargs)
    elif options.kernels.sequence_shards != sequence_shards(mesh):
        raise ValueError(f"options were resolved for {options.kernels.sequence_shards} sequence shards but the "
                         f"mesh has {sequence_shards(mesh)}: resolve_options(config, mesh=mesh)")
    shardings = None
    if mesh is not None:
        shardings = functools.partial(param_shardings, mesh=mesh)
    _, params = load_checkpoint(path, dtype=options.dtype, strict=strict, shardings=shardings, progress=progress)
    has_tokenizer = os.path.isfile(os.path.join(path, "tokenizer.json"))
    return Model(config=config, options=options, params=params, mesh=mesh,
                 tokenizer=load_tokenizer(path) if has_tokenizer else None)
