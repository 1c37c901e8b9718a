"""Model configuration: the HF ``config.json`` of SpikingBrain2.0 (``model_type = "sse_swa_moba"``).

``SpB2Config`` reads every field the official configs use (including the ``attn`` sub-dict), validates the
combination up front and raises one ``ValueError`` that names the bad field and value. Keys that do not affect
the model (``architectures``, ``auto_map``, ``transformers_version``...) are kept in ``extra`` so that an
exported ``config.json`` round-trips.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any, Mapping

LINEAR_ATTN_TYPES = ("gdn", "gla")
SSE_IMPLEMENTATIONS = ("varlen", "mask")
MODEL_TYPE = "sse_swa_moba"


class LayerKind:
    """Token-mixer kind of one decoder layer (see DESIGN.md, "Layer kinds")."""

    FULL = "full"  # full causal softmax attention
    MOBA = "moba"  # MoBA block-sparse softmax attention
    SSE_GDN = "sse_gdn"  # SSE (gated delta rule) + sliding-window attention hybrid
    SSE_GLA = "sse_gla"  # SSE (GLA) + sliding-window attention hybrid


@dataclasses.dataclass(frozen=True)
class AttnConfig:
    """The ``attn`` sub-dict: softmax-attention layers (full, MoBA) and the SWA half of SSE layers."""

    layers: tuple[int, ...]
    num_heads: int
    full_layers: tuple[int, ...] = ()
    num_kv_heads: int | None = None
    qk_norm: bool = False
    qkv_bias: bool = False
    rope_theta: float = 10000.0
    window_size: int | None = None
    moba_chunk_size: int = 1024
    moba_topk: int = 4

    @property
    def kv_heads(self) -> int:
        return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "AttnConfig":
        if not isinstance(d, Mapping):
            raise ValueError(f"attn must be a dict, got {type(d).__name__}: {d!r}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"attn has unknown keys {unknown}; known keys are {sorted(known)}")
        for key in ("layers", "num_heads"):
            if key not in d:
                raise ValueError(f"attn.{key} is required (got attn={dict(d)!r})")
        kw = dict(d)
        kw["layers"] = tuple(int(i) for i in kw["layers"])
        kw["full_layers"] = tuple(int(i) for i in kw.get("full_layers") or ())
        if kw.get("rope_theta") is not None:
            kw["rope_theta"] = float(kw["rope_theta"])
        return cls(**kw)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["layers"] = list(self.layers)
        d["full_layers"] = list(self.full_layers)
        d["num_kv_heads"] = self.kv_heads
        return d


@dataclasses.dataclass(frozen=True)
class SpB2Config:
    """Hyper-parameters of ``SSESWAMoBAForCausalLM``; field names and defaults follow the official config class.

    Build it with ``SpB2Config.from_dict(json_dict)``, ``from_json_file(path)`` or ``from_pretrained(dir)``;
    construction validates everything (``ValueError`` naming the field and the bad value).
    """

    attn: AttnConfig
    vocab_size: int = 32000
    hidden_size: int = 2048
    num_hidden_layers: int = 24
    num_heads: int = 8
    head_dim: int = 256
    num_v_heads: int | None = None
    expand_v: float = 1.0
    hidden_ratio: int | None = 4
    intermediate_size: int | None = None
    hidden_act: str = "swish"
    norm_eps: float = 1e-6
    linear_attn_type: str = "gdn"
    sse_implementation: str = "varlen"
    sse_qk_relu: bool = False
    num_sparse_partition: int = 4
    num_writer: int = 2
    num_reader: int = 2
    allow_neg_eigval: bool = False
    use_output_gate: bool = True
    use_short_conv: bool = False
    conv_size: int = 4
    attn_mode: str = "chunk"
    aux_loss_coef: float = 0.01
    swa_dropout: float = 0.5
    max_position_embeddings: int = 2048
    mrope_section: tuple[int, ...] | None = None  # VL text stacks: interleaved M-RoPE (t, h, w) frequency counts
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    pad_token_id: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | tuple[int, ...] | None = 2
    use_cache: bool = True
    fuse_norm: bool = True
    fuse_swiglu: bool = True
    fuse_cross_entropy: bool = False
    fuse_linear_cross_entropy: bool = False
    use_l2warp: bool = False
    dtype: str | None = None  # the checkpoint's torch dtype string ("float32", "bfloat16"), informational
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict, compare=False)

    def __post_init__(self):
        _validate(self)

    # ---- derived sizes ----
    @functools.cached_property
    def mlp_intermediate_size(self) -> int:
        """``intermediate_size``, or the official GatedMLP default (2/3 * ratio * hidden, rounded up to 256)."""
        if self.intermediate_size is not None:
            return self.intermediate_size
        ratio = 4 if self.hidden_ratio is None else self.hidden_ratio
        size = int(self.hidden_size * ratio * 2 / 3)
        return 256 * ((size + 255) // 256)

    def layer_kind(self, layer_idx: int) -> str:
        """The ``LayerKind`` of decoder layer ``layer_idx``."""
        if not 0 <= layer_idx < self.num_hidden_layers:
            raise ValueError(f"{layer_idx=} is outside the model ({self.num_hidden_layers=})")
        if layer_idx in self.attn.layers:
            return LayerKind.FULL if layer_idx in self.attn.full_layers else LayerKind.MOBA
        return LayerKind.SSE_GDN if self.linear_attn_type == "gdn" else LayerKind.SSE_GLA

    @property
    def layer_kinds(self) -> tuple[str, ...]:
        return tuple(self.layer_kind(i) for i in range(self.num_hidden_layers))

    # ---- (de)serialisation ----
    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "SpB2Config":
        """Build from a ``config.json`` dict; unknown top-level keys are kept in ``extra``."""
        if not isinstance(d, Mapping):
            raise ValueError(f"config must be a dict, got {type(d).__name__}")
        model_type = d.get("model_type", MODEL_TYPE)
        if model_type != MODEL_TYPE:
            raise ValueError(f"model_type={model_type!r} is not supported; expected {MODEL_TYPE!r}")
        if d.get("attn") is None:
            raise ValueError("attn is required: SpikingBrain2.0 configs always have an `attn` sub-dict")
        names = {f.name for f in dataclasses.fields(cls)} - {"extra", "attn"}
        kw: dict[str, Any] = {k: d[k] for k in names if k in d}
        if isinstance(kw.get("mrope_section"), list):
            kw["mrope_section"] = tuple(kw["mrope_section"])
        if isinstance(kw.get("eos_token_id"), list):
            kw["eos_token_id"] = tuple(kw["eos_token_id"])
        if "dtype" not in kw and "torch_dtype" in d:
            kw["dtype"] = d["torch_dtype"]
        extra = {k: v for k, v in d.items() if k not in names and k not in ("attn", "torch_dtype")}
        return cls(attn=AttnConfig.from_dict(d["attn"]), extra=extra, **kw)

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> "SpB2Config":
        with open(path) as f:
            try:
                d = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{os.fspath(path)} is not valid JSON: {e}") from e
        return cls.from_dict(d)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> "SpB2Config":
        """Read ``<directory>/config.json``."""
        path = os.path.join(os.fspath(directory), "config.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no config.json in {os.fspath(directory)!r}")
        return cls.from_json_file(path)

    def to_dict(self) -> dict[str, Any]:
        """The HF ``config.json`` dict (extras included, ``model_type`` set)."""
        d: dict[str, Any] = dict(self.extra)
        for f in dataclasses.fields(self):
            if f.name in ("extra", "attn"):
                continue
            d[f.name] = getattr(self, f.name)
        d["attn"] = self.attn.to_dict()
        if d["mrope_section"] is None:
            del d["mrope_section"]  # text checkpoints never had the key
        else:
            d["mrope_section"] = list(d["mrope_section"])
        if isinstance(d["eos_token_id"], tuple):
            d["eos_token_id"] = list(d["eos_token_id"])
        d["model_type"] = MODEL_TYPE
        d.setdefault("architectures", ["SSESWAMoBAForCausalLM"])
        return dict(sorted(d.items()))

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    def replace(self, **changes) -> "SpB2Config":
        """A validated copy with some fields changed (``attn`` may be given as a dict of changes)."""
        if isinstance(changes.get("attn"), Mapping):
            changes["attn"] = dataclasses.replace(self.attn, **changes["attn"])
        return dataclasses.replace(self, **changes)


def _fail(field: str, value: Any, why: str) -> None:
    raise ValueError(f"invalid config: {field}={value!r}: {why}")


def _validate(c: SpB2Config) -> None:
    a = c.attn
    if not isinstance(a, AttnConfig):
        _fail("attn", a, "must be an AttnConfig (use SpB2Config.from_dict for json dicts)")
    for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_heads", "head_dim",
                 "num_sparse_partition", "num_writer", "num_reader"):
        v = getattr(c, name)
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            _fail(name, v, "must be a positive integer")
    if c.mrope_section is not None:
        sec = c.mrope_section
        if (len(sec) != 3 or any(not isinstance(s, int) or s < 0 for s in sec) or sum(sec) != c.head_dim // 2
                or 3 * max(sec[1], sec[2]) > c.head_dim // 2 + 2):
            _fail("mrope_section", list(sec), f"must be 3 non-negative (t, h, w) frequency counts summing to "
                  f"head_dim / 2 = {c.head_dim // 2}")
    for name in ("num_heads", "num_kv_heads", "moba_chunk_size", "moba_topk"):
        v = getattr(a, name)
        if v is None and name == "num_kv_heads":
            continue
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            _fail(f"attn.{name}", v, "must be a positive integer")
    if a.window_size is not None and (not isinstance(a.window_size, int) or a.window_size <= 0):
        _fail("attn.window_size", a.window_size, "must be a positive integer or null")
    if c.linear_attn_type not in LINEAR_ATTN_TYPES:
        _fail("linear_attn_type", c.linear_attn_type, f"must be one of {LINEAR_ATTN_TYPES}")
    if c.sse_implementation not in SSE_IMPLEMENTATIONS:
        _fail("sse_implementation", c.sse_implementation, f"must be one of {SSE_IMPLEMENTATIONS}")
    for name in ("num_writer", "num_reader"):
        v = getattr(c, name)
        if v >= c.num_sparse_partition:
            _fail(name, v, f"must be smaller than num_sparse_partition={c.num_sparse_partition}")
    if c.sse_implementation == "varlen" and c.num_reader != c.num_writer:
        _fail("num_reader", c.num_reader,
              f"sse_implementation='varlen' requires num_reader == num_writer (={c.num_writer})")
    for name, idxs in (("attn.layers", a.layers), ("attn.full_layers", a.full_layers)):
        for i in idxs:
            if not 0 <= i < c.num_hidden_layers:
                _fail(name, list(idxs), f"layer index {i} is outside the model "
                      f"(num_hidden_layers={c.num_hidden_layers})")
        if len(set(idxs)) != len(idxs):
            _fail(name, list(idxs), "has repeated layer indices")
    missing = sorted(set(a.full_layers) - set(a.layers))
    if missing:
        _fail("attn.full_layers", list(a.full_layers), f"layers {missing} are not in attn.layers")
    if a.num_heads % a.kv_heads:
        _fail("attn.num_kv_heads", a.kv_heads, f"must divide attn.num_heads={a.num_heads}")
    if c.num_heads % a.kv_heads:
        _fail("attn.num_kv_heads", a.kv_heads, f"must divide num_heads={c.num_heads} (SWA heads)")
    if c.num_v_heads is not None and c.num_v_heads != c.num_heads:
        _fail("num_v_heads", c.num_v_heads, f"must equal num_heads={c.num_heads} (the official model has no GVA)")
    if float(c.expand_v) != 1.0:
        _fail("expand_v", c.expand_v, "the official SSE layers require expand_v == 1")
    if c.hidden_act != "swish":
        _fail("hidden_act", c.hidden_act, "only 'swish' is supported (as in the official GatedMLP)")
    if c.use_short_conv:
        _fail("use_short_conv", c.use_short_conv, "short convolutions are not used by SpikingBrain2.0 "
              "and are not implemented")
    if c.use_l2warp:
        _fail("use_l2warp", c.use_l2warp, "l2warp is not implemented")
    if c.attn_mode not in ("chunk", "fused_recurrent"):
        _fail("attn_mode", c.attn_mode, "must be 'chunk' or 'fused_recurrent'")
    if not 0.0 <= c.swa_dropout <= 1.0:
        _fail("swa_dropout", c.swa_dropout, "must be a probability in [0, 1]")
    if c.intermediate_size is not None and c.intermediate_size <= 0:
        _fail("intermediate_size", c.intermediate_size, "must be a positive integer or null")
    if c.norm_eps <= 0:
        _fail("norm_eps", c.norm_eps, "must be positive")
