"""SSE (sparse state expansion) token mixing: router, the shared + sparse recurrences in both official forms.

P partitions; a token writes to its top-``num_writer`` partitions of ``p = softmax(router logits)`` and reads
from its top-``num_reader``. The shared branch is one recurrence over all tokens; the sparse branch has one
state per partition.

- ``"varlen"`` form (official default, requires readers == writers): partition i runs over *only* the tokens
  that write to i, with inputs ``q * p_i``, ``k * p_i``; a token's output adds the outputs of the partitions it
  belongs to. Here this is expressed without gathers: a non-writing token is an exact no-op on partition i
  (GDN: ``g = beta = 0``; GLA: ``gk = 0``, ``k = 0``), and its partition output is masked out.
- ``"mask"`` form: every partition runs over all tokens with ``q * p * read``, ``k * p * write``,
  ``v * write``; GLA gates ``gk * write``; GDN gates ``g * read`` and ``beta * read`` (official quirk); the
  outputs of all partitions are summed.

States are float32 ``[B, 1 + P, N, H, E]``: index 0 is the shared state, 1..P the partitions.

Shape letters: see ``spb2_jax.parallel.rules`` (P partitions, N heads, H key head dim, E value head dim); in the
rearrange patterns ``p`` counts the ``1 + P`` branches (shared + partitions).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from einops import rearrange

from spb2_jax.ops import dispatch
from spb2_jax.ops.dtypes import acc_dtype
from spb2_jax.ops.segments import Segments, as_segments
from spb2_jax.options import Kernels

FORMS = ("varlen", "mask")
_REFERENCE = Kernels.resolve("reference")


def topk_mask(p: jax.Array, k: int) -> jax.Array:
    """Boolean mask of the top-``k`` entries of ``p`` over the last axis (ties: lower index first).

    By rank, not ``lax.top_k``: entry i is kept when fewer than ``k`` entries beat it (larger, or equal at a lower
    index) -- the same choice as ``top_k``, elementwise over the other axes. (XLA's SPMD partitioner all-gathers a
    ``top_k`` operand that is sharded over time, a T-sized collective in every SSE layer under sequence
    parallelism; P partitions make this ``P^2`` comparisons per token.)"""
    i = jnp.arange(p.shape[-1])
    pi, pj = p[..., :, None], p[..., None, :]
    beats = (pj > pi) | ((pj == pi) & (i[None, :] < i[:, None]))  # [..., i, j]: j beats i
    return jnp.sum(beats, axis=-1) < k


def sse_route(logits: jax.Array, num_writer: int, num_reader: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Router: ``p = softmax(logits)`` in float32 ``[B, T, P]`` plus boolean writer and reader masks."""
    p = jax.nn.softmax(logits.astype(acc_dtype(logits)), axis=-1)
    return p, topk_mask(p, num_writer), topk_mask(p, num_reader)


def sse_aux_loss(p: jax.Array, write: jax.Array, valid: jax.Array, num_writer: int) -> jax.Array:
    """Load-balance loss ``P / num_writer * sum_i mean_tok(p_i) * mean_tok(write_i)`` over ``valid`` tokens."""
    P = p.shape[-1]
    valid = valid.astype(p.dtype)[..., None]  # [B, T, 1]
    count = jnp.maximum(valid.sum(), 1.0)
    mean_p = (p * valid).sum((0, 1)) / count
    mean_w = (write.astype(p.dtype) * valid).sum((0, 1)) / count
    return jnp.sum(mean_p * mean_w) * P / num_writer


def _expand_sparse(q2, k2, p, write, read, form):
    """Per-partition q, k ``[B, T, P, N, H]`` and the (gate mask, output mask) ``[B, T, P]`` of each form."""
    dtype = q2.dtype
    pq = p.astype(dtype)
    w = write.astype(dtype)
    r = read.astype(dtype)
    if form == "varlen":
        qn = q2[:, :, None] * pq[..., None, None]
        kn = k2[:, :, None] * (pq * w)[..., None, None]  # non-writers are masked (and no-ops anyway)
        return qn, kn, w, w
    qn = q2[:, :, None] * (pq * r)[..., None, None]
    kn = k2[:, :, None] * (pq * w)[..., None, None]
    return qn, kn, r, None


def _check_form(form: str) -> None:
    if form not in FORMS:
        raise ValueError(f"sse form={form!r} must be one of {FORMS}")


def _cat_heads(shared: jax.Array, sparse: jax.Array) -> jax.Array:
    """``[B, T, N, ...]`` + ``[B, T, P, N, ...]`` -> ``[B, T, (1 + P) * N, ...]``."""
    both = jnp.concatenate([shared[:, :, None], sparse], axis=2)
    return rearrange(both, "B T p N ... -> B T (p N) ...")


def _split_out(o: jax.Array, out_mask: jax.Array | None, n_total: int) -> jax.Array:
    """Sum the shared output and the (masked) partition outputs: ``[B, T, (1+P)N, E] -> [B, T, N, E]``."""
    o = rearrange(o, "B T (p N) E -> B T p N E", p=n_total)
    o = o.astype(acc_dtype(o))
    shared, sparse = o[:, :, 0], o[:, :, 1:]
    if out_mask is not None:
        sparse = sparse * out_mask.astype(o.dtype)[..., None, None]
    return shared + sparse.sum(2)


def _state_in(initial_state):
    return None if initial_state is None else rearrange(initial_state, "B p N H E -> B (p N) H E")


def sse_gdn(
    q1, k1, q2, k2, v, g, beta, p, write, read, *,
    form: str = "varlen",
    segment_ids: Segments | jax.Array | None = None,
    initial_state: jax.Array | None = None,
    kernels: Kernels = Kernels(),
) -> tuple[jax.Array, jax.Array]:
    """SSE with the gated delta rule (q, k L2-normalised inside the recurrence).

    Args:
      q1, k1 (shared) and q2, k2 (sparse): ``[B, T, N, H]`` after the feature map; v: ``[B, T, N, E]``.
      g, beta: ``[B, T, 2, N]``: index 0 -> shared branch, 1 -> sparse branch.
      p: router probabilities ``[B, T, P]``; write, read: boolean ``[B, T, P]``.
      form: ``"varlen"`` or ``"mask"`` (module docstring). initial_state: ``[B, 1 + P, N, H, E]``.
      segment_ids: ``[B, T]`` ids (0 = padding) or a ``Segments``.
      kernels: the resolved ``spb2_jax.options.Kernels`` (default: the XLA chunked recurrences; ``gdn`` /
        ``gla`` field pick the path, ``spb2_jax.ops.dispatch``); a non-writing token is an exact no-op on a
        partition in every path.
    Returns:
      ``o [B, T, N, E]`` (``v.dtype``) and the final states ``[B, 1 + P, N, H, E]`` float32.
    """
    _check_form(form)
    P = p.shape[-1]
    qn, kn, gate_mask, out_mask = _expand_sparse(q2, k2, p, write, read, form)
    gm = gate_mask.astype(g.dtype)[..., None]  # [B, T, P, 1]
    g_all = jnp.concatenate([g[:, :, :1], g[:, :, 1:2] * gm], axis=2)  # [B, T, 1+P, N]
    b_all = jnp.concatenate([beta[:, :, :1], beta[:, :, 1:2] * gm.astype(beta.dtype)], axis=2)
    v_sparse = jnp.broadcast_to(v[:, :, None], v.shape[:2] + (P,) + v.shape[2:])
    if form == "mask":
        v_sparse = v_sparse * write.astype(v.dtype)[..., None, None]
    o, state = dispatch.gated_delta_rule(
        _cat_heads(q1, qn), _cat_heads(k1, kn), _cat_heads(v, v_sparse),
        rearrange(g_all, "B T p N -> B T (p N)"), rearrange(b_all, "B T p N -> B T (p N)"),
        initial_state=_state_in(initial_state), segments=as_segments(segment_ids, *p.shape[:2]), kernels=kernels,
        use_qk_l2norm=True)
    out = _split_out(o, out_mask, P + 1).astype(v.dtype)
    return out, rearrange(state, "B (p N) H E -> B p N H E", p=P + 1)


def sse_gla(
    q1, k1, q2, k2, v, gk, p, write, read, *,
    form: str = "varlen",
    segment_ids: Segments | jax.Array | None = None,
    initial_state: jax.Array | None = None,
    kernels: Kernels = Kernels(),
) -> tuple[jax.Array, jax.Array]:
    """SSE with gated linear attention (per-key log gates).

    Args:
      q1, k1, q2, k2: ``[B, T, N, H]`` after the feature maps; v: ``[B, T, N, E]``.
      gk: ``[B, T, 2, N, H]`` log gates: index 0 -> shared branch, 1 -> sparse branch.
      p, write, read, form, segment_ids, initial_state, kernels: as in ``sse_gdn``.
    Returns:
      ``o [B, T, N, E]`` and the final states ``[B, 1 + P, N, H, E]`` float32.
    """
    _check_form(form)
    P = p.shape[-1]
    qn, kn, _, out_mask = _expand_sparse(q2, k2, p, write, read, form)
    wm = write.astype(gk.dtype)[..., None, None]  # [B, T, P, 1, 1]
    gk_sparse = gk[:, :, 1:2] * wm  # both forms gate the sparse decay with the write mask
    v_sparse = jnp.broadcast_to(v[:, :, None], v.shape[:2] + (P,) + v.shape[2:])
    if form == "mask":
        v_sparse = v_sparse * write.astype(v.dtype)[..., None, None]
    o, state = dispatch.gla(
        _cat_heads(q1, qn), _cat_heads(k1, kn), _cat_heads(v, v_sparse), _cat_heads(gk[:, :, 0], gk_sparse),
        initial_state=_state_in(initial_state), segments=as_segments(segment_ids, *p.shape[:2]), kernels=kernels)
    out = _split_out(o, out_mask, P + 1).astype(v.dtype)
    return out, rearrange(state, "B (p N) H E -> B p N H E", p=P + 1)


def sse_gdn_reference(*args, **kwargs) -> tuple[jax.Array, jax.Array]:
    """``sse_gdn`` with the per-token reference recurrence."""
    return sse_gdn(*args, **kwargs, kernels=_REFERENCE)


def sse_gla_reference(*args, **kwargs) -> tuple[jax.Array, jax.Array]:
    """``sse_gla`` with the per-token reference recurrence."""
    return sse_gla(*args, **kwargs, kernels=_REFERENCE)
