"""How the model runs: one frozen ``ModelOptions`` record, resolved ONCE at the model boundary.

``resolve_options(config, dtype=..., impl=..., ...)`` turns (config, user arguments, backend) into a
``ModelOptions``; ``SpB2ForCausalLM``, ``prefill`` / ``decode_step`` / ``generate``, ``load_pretrained`` and the
CLIs call it, and everything below them (layers, ``spb2_jax.ops.dispatch``, the ``pallas_kernels`` wrappers)
only reads the record. Nothing below this module looks at ``jax.default_backend()``.

Decisions made here and nowhere else:

- **Kernels per op** (``Kernels``): ``impl="xla"`` (chunked recurrences, blockwise attention: linear memory in
  T), ``"pallas"`` (the Pallas kernels) or ``"reference"`` (per-token scans, dense masks: the ground truth).
  With ``impl="pallas"``:

  * GLA has no Pallas kernel: ``gla`` runs the XLA chunked path.
  * The gated-delta-rule kernel is float32 only: with a float64 compute dtype (``jax_enable_x64`` tests)
    ``gdn`` runs the XLA chunked path.
  * The Pallas target is ``"mosaic_tpu"`` on TPU and ``"triton"`` elsewhere; ``interpret=True`` on CPU (the only
    backend without a Pallas lowering here: slow, for tests).
  * The MoBA algorithm is ``"gathered"`` on both targets (work = the selected pairs; ``"union"`` on request).

- **dtypes**: ``dtype`` (compute) and ``param_dtype`` (storage); recurrences, softmax statistics, norms and
  losses accumulate in float32 regardless.
- **remat policy** of the decoder block (``REMAT_POLICIES``, see ``spb2_jax.layers.block``).
- **activation coding** (``coding``): ``"none"``, ``"fp8"`` (e4m3 weights and per-token activations, one float8
  ``dot_general`` per linear layer) or ``"int8_spiking"`` (SpikingBrain's spike counts with threshold
  ``mean|x| / spike_k`` times INT8 weights, exact int32 products); quantised params come from
  ``spb2_jax.quant.quantize``. ``quantize_lm_head`` also codes an untied LM head.
- **decoding**: ``moba_decode`` (``"exact"``: the forward's per-token block selection; ``"dense"``: the official
  cached path) and ``official_rope_offset`` (the official cache's RoPE quirk).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

IMPLS = ("reference", "xla", "pallas")
DEFAULT_IMPL = "xla"
TARGETS = ("triton", "mosaic_tpu")
MOBA_ALGORITHMS = ("gathered", "union")
REMAT_POLICIES = ("none", "full", "save_dots", "save_mixer_outputs")
MOBA_DECODE = ("exact", "dense")
CODINGS = ("none", "fp8", "int8_spiking")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16, "float64": jnp.float64}


def check_impl(impl: str) -> str:
    """Validate an ``impl`` name (``ValueError`` naming it otherwise)."""
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r} is not one of {IMPLS}")
    return impl


def canonical_dtype(dtype: Any, what: str = "dtype") -> Any:
    """A dtype given as a name (``"bfloat16"``), numpy dtype or jnp scalar type -> the jnp scalar type."""
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"{what}={dtype!r} is not one of {sorted(DTYPES)}")
        return DTYPES[dtype]
    try:
        name = jnp.dtype(dtype).name
    except TypeError:
        raise ValueError(f"{what}={dtype!r} is not a dtype") from None
    if name not in DTYPES:
        raise ValueError(f"{what}={name} is not a floating dtype the model supports ({sorted(DTYPES)})")
    return DTYPES[name]


@dataclasses.dataclass(frozen=True)
class Kernels:
    """The implementation of every token-mixing op (each ``"reference"``, ``"xla"`` or ``"pallas"``) and the
    Pallas parameters. Build it with ``resolve_options`` (or ``Kernels.resolve``), not by hand.

    Attributes:
      impl: what the user asked for (``IMPLS``); the per-op fields below are what runs.
      attention, window, moba, gdn, gla: full causal attention, sliding-window attention, MoBA, gated delta
        rule, GLA.
      target: Pallas target (``TARGETS``); interpret: run Pallas kernels in interpret mode (CPU).
      block_size: attention tile (query and key) of the blockwise / Pallas paths.
      moba_algorithm: Pallas MoBA algorithm (``MOBA_ALGORITHMS``).
      chunk_size: chunk length of the chunked recurrences.
      sequence_shards: shards of the time axis (mesh axis ``sequence``); > 1 runs every token mixer sequence-
        parallel (``spb2_jax.parallel.sequence``) under the current mesh.
    """

    impl: str = DEFAULT_IMPL
    attention: str = DEFAULT_IMPL
    window: str = DEFAULT_IMPL
    moba: str = DEFAULT_IMPL
    gdn: str = DEFAULT_IMPL
    gla: str = DEFAULT_IMPL
    target: str = "triton"
    interpret: bool = False
    block_size: int = 128
    moba_algorithm: str = "gathered"
    chunk_size: int = 64
    sequence_shards: int = 1

    @classmethod
    def resolve(cls, impl: str = DEFAULT_IMPL, *, dtype: Any = jnp.float32, backend: str | None = None,
                target: str | None = None, interpret: bool | None = None, block_size: int = 128,
                moba_algorithm: str | None = None, chunk_size: int = 64, sequence_shards: int = 1) -> "Kernels":
        """Per-op implementations for ``impl`` (module docstring: the fallbacks). ``backend`` (default
        ``jax.default_backend()``) is only consulted for ``impl="pallas"`` when target / interpret are not given."""
        check_impl(impl)
        if block_size < 1 or chunk_size < 1 or sequence_shards < 1:
            raise ValueError(f"{block_size=}, {chunk_size=} and {sequence_shards=} must be positive")
        if impl != "pallas":
            return cls(impl=impl, attention=impl, window=impl, moba=impl, gdn=impl, gla=impl,
                       block_size=block_size, chunk_size=chunk_size, sequence_shards=sequence_shards)
        if target is None or interpret is None:
            backend = jax.default_backend() if backend is None else backend
        target = ("mosaic_tpu" if backend == "tpu" else "triton") if target is None else target
        if target not in TARGETS:
            raise ValueError(f"target={target!r} is not one of {TARGETS}")
        interpret = (backend == "cpu") if interpret is None else bool(interpret)
        moba_algorithm = moba_algorithm or "gathered"
        if moba_algorithm not in MOBA_ALGORITHMS:
            raise ValueError(f"moba_algorithm={moba_algorithm!r} is not one of {MOBA_ALGORITHMS}")
        gdn = "xla" if jnp.dtype(canonical_dtype(dtype)) == jnp.float64 else "pallas"  # kernel is float32-only
        return cls(impl=impl, attention="pallas", window="pallas", moba="pallas", gdn=gdn, gla="xla",
                   target=target, interpret=interpret, block_size=block_size, moba_algorithm=moba_algorithm,
                   chunk_size=chunk_size, sequence_shards=sequence_shards)

    @property
    def pallas_args(self) -> dict[str, Any]:
        """Keyword arguments every ``pallas_kernels`` wrapper takes."""
        return {"target": self.target, "interpret": self.interpret}


@dataclasses.dataclass(frozen=True)
class ModelOptions:
    """Everything about HOW the model runs (the config says WHAT it computes); frozen and hashable, so it is a
    static field of the Flax modules and a static argument of jitted functions.

    Attributes:
      dtype: compute dtype; param_dtype: parameter storage dtype.
      kernels: per-op implementations (``Kernels``).
      remat: decoder-block rematerialisation policy (``REMAT_POLICIES``).
      moba_decode: ``"exact"`` or ``"dense"`` (official cached MoBA decode).
      official_rope_offset: reproduce the official cache's RoPE offset (+1 in layers >= 1) when decoding.
      coding: activation coding of the linear layers (``CODINGS``); spike_k: the INT8-Spiking threshold divisor
        k; quantize_lm_head: code an untied LM head too.
      official_qk_bf16: round q and k to bfloat16 after the q / k norms in every softmax attention, as the
        official VL code does even in float32 (its flash-attention cast); on for VL checkpoints by default.
    """

    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    kernels: Kernels = Kernels()
    remat: str = "none"
    moba_decode: str = "exact"
    official_rope_offset: bool = False
    coding: str = "none"
    spike_k: float = 3.0
    quantize_lm_head: bool = False
    official_qk_bf16: bool = False

    @property
    def sequence_parallel(self) -> bool:
        """The token mixers run over shards of the time axis (``kernels.sequence_shards > 1``)."""
        return self.kernels.sequence_shards > 1

    def replace(self, **changes) -> "ModelOptions":
        """A copy with some fields changed (validated)."""
        out = dataclasses.replace(self, **changes)
        _validate(out)
        return out


def _validate(o: ModelOptions) -> None:
    if o.remat not in REMAT_POLICIES:
        raise ValueError(f"remat={o.remat!r} is not one of {REMAT_POLICIES}")
    if o.moba_decode not in MOBA_DECODE:
        raise ValueError(f"moba_decode={o.moba_decode!r} is not one of {MOBA_DECODE}")
    if not isinstance(o.kernels, Kernels):
        raise ValueError(f"kernels must be a Kernels record, got {type(o.kernels).__name__}")
    if o.coding not in CODINGS:
        raise ValueError(f"coding={o.coding!r} is not one of {CODINGS}")
    if not o.spike_k > 0:
        raise ValueError(f"spike_k={o.spike_k} must be > 0 (the spiking threshold is mean|x| / k)")


def resolve_options(
    config: Any = None,
    *,
    dtype: Any = None,
    param_dtype: Any = None,
    impl: str | None = None,
    target: str | None = None,
    interpret: bool | None = None,
    block_size: int = 128,
    moba_algorithm: str | None = None,
    chunk_size: int = 64,
    remat: str = "none",
    moba_decode: str = "exact",
    official_rope_offset: bool = False,
    backend: str | None = None,
    mesh: Any = None,
    coding: str = "none",
    spike_k: float = 3.0,
    quantize_lm_head: bool = False,
    official_qk_bf16: bool = False,
) -> ModelOptions:
    """The one place where the options are decided (module docstring).

    Args:
      config: the ``SpB2Config`` (reserved for config-dependent choices; may be None).
      dtype: compute dtype (name or dtype), default float32. param_dtype: storage dtype of initialised params,
        default float32 (``load_hf`` / ``load_pretrained`` load checkpoints in ``dtype``).
      impl: ``"xla"`` (default), ``"pallas"`` or ``"reference"``.
      target, interpret, moba_algorithm: Pallas choices; default by ``backend``.
      block_size, chunk_size: attention tile and recurrence chunk.
      remat: ``"none"``, ``"full"``, ``"save_dots"`` or ``"save_mixer_outputs"``.
      moba_decode, official_rope_offset: decoding behaviour (``spb2_jax.generate``).
      backend: override ``jax.default_backend()`` (tests).
      mesh: the ``jax.sharding.Mesh`` the model will run under (``spb2_jax.parallel.make_mesh``): with a
        ``sequence`` axis of size > 1 the token mixers run sequence-parallel over it
        (``Kernels.sequence_shards``). The model must then be applied under ``spb2_jax.parallel.use_rules(mesh)``.
      coding, spike_k, quantize_lm_head: activation coding (``"none"``, ``"fp8"``, ``"int8_spiking"``; params from
        ``spb2_jax.quant.quantize``), the spiking threshold divisor, whether an untied LM head is coded.
      official_qk_bf16: the official VL model's bf16 rounding of q / k after their norms (``ModelOptions``).
    """
    del config
    shards = 1 if mesh is None else int(dict(mesh.shape).get("sequence", 1))
    dtype = canonical_dtype(jnp.float32 if dtype is None else dtype)
    param_dtype = canonical_dtype(jnp.float32 if param_dtype is None else param_dtype, "param_dtype")
    kernels = Kernels.resolve(DEFAULT_IMPL if impl is None else impl, dtype=dtype, backend=backend, target=target,
                              interpret=interpret, block_size=block_size, moba_algorithm=moba_algorithm,
                              chunk_size=chunk_size, sequence_shards=shards)
    opts = ModelOptions(dtype=dtype, param_dtype=param_dtype, kernels=kernels, remat=remat,
                        moba_decode=moba_decode, official_rope_offset=bool(official_rope_offset), coding=coding,
                        spike_k=float(spike_k), quantize_lm_head=bool(quantize_lm_head),
                        official_qk_bf16=bool(official_qk_bf16))
    _validate(opts)
    return opts


def options_from(options: ModelOptions | None, config: Any = None, **legacy) -> ModelOptions:
    """``options`` if given, else ``resolve_options(config, **legacy)``; giving both is an error (one source of
    truth). ``legacy`` holds the old keywords (``impl=``, ``dtype=``...) whose value None means "not given"."""
    given = {k: v for k, v in legacy.items() if v is not None}
    if options is not None:
        if given:
            raise ValueError(f"pass either options= or {sorted(given)}, not both")
        if not isinstance(options, ModelOptions):
            raise ValueError(f"options must be a ModelOptions (spb2_jax.resolve_options), got {type(options).__name__}")
        return options
    return resolve_options(config, **given)
