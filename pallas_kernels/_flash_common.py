"""Shared internals of the block-sparse flash-attention kernels: the per-token mask, the tile check, the
backward's ``delta``, the float32-accumulated matmul and the online-softmax / dQ / dK-dV tile steps.

Used by both kernel families, the GPU-style (``block_sparse_flash``, ``moba_gathered``) and the TPU-style
(``block_sparse_flash_tpu``) ones, so that they compute the same thing by construction. Nothing here picks a
target or builds a ``pallas_call``; the names are public within the package, the module is not part of its API.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

MASKED = -1e30  # logit of a masked (query, key) pair and initial running maximum


def token_mask(spec, rel, q_seg, k_seg, q_blk, k_blk, q_sel):
    """``[tq, tk]`` boolean mask (``block_sparse_flash``'s module docstring) from broadcastable per-token
    metadata: ``spec`` a ``block_sparse_flash.MaskSpec``; ``rel`` = query position - key position ``[tq, tk]``;
    ``q_*`` columns ``[tq, 1]``, ``k_*`` rows ``[1, tk]``; ``q_sel`` a sequence of ``R`` selection columns
    ``[tq, 1]``."""
    mask = (q_seg == k_seg) & (q_seg != 0) & (rel >= 0)
    if spec.window is not None:
        mask = mask & (rel < spec.window)
    if spec.moba:
        member = q_blk == k_blk
        for col in q_sel:
            member = member | (col == k_blk)
        mask = mask & member
    return mask


def check_whole_tiles(T, block):
    """The grid covers ``T // block`` tiles: a partial last tile would be dropped, so callers pad."""
    if T % block:
        raise ValueError(f"block_sparse_attention needs T % block == 0, got T={T} block={block}; pad with segment 0")


def row_delta(o, do):
    """``delta = rowsum(dO * O)`` of the backward, ``[B, N, T]`` float32 from ``o, do [B, T, N, H]``."""
    return jnp.einsum("BTNH,BTNH->BNT", o.astype(jnp.float32), do.astype(jnp.float32))


def dot(a, b, trans_b=False):
    """float32-accumulated matmul; float32 operands at full precision (``HIGHEST``: no TF32 on GPU)."""
    dims = (((a.ndim - 1,), (b.ndim - 1 if trans_b else 0,)), ((), ()))
    precision = jax.lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return jax.lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def softmax_step(carry, q, k, v, mask, scale):
    """One key tile of the online softmax: ``carry = (o [t, H], m [t], l [t])`` float32, ``mask [t, s]``."""
    o, m, l = carry
    s = jnp.where(mask, dot(q, k, trans_b=True) * scale, MASKED)  # [t, s] float32
    m_new = jnp.maximum(m, s.max(axis=-1))
    p = jnp.where(mask, jnp.exp(s - m_new[:, None]), 0.0)
    corr = jnp.exp(m - m_new)
    o = o * corr[:, None] + dot(p.astype(v.dtype), v)
    return o, m_new, l * corr + p.sum(axis=-1)


def softmax_init(rows, H):
    """Empty online-softmax carry for ``rows`` queries."""
    return (jnp.zeros((rows, H), jnp.float32), jnp.full((rows,), MASKED, jnp.float32),
            jnp.zeros((rows,), jnp.float32))


def softmax_finish(o, m, l):
    """``(o / l, lse)``; rows that saw no key (padding) give 0 and lse 0."""
    empty = l == 0.0
    safe = jnp.where(empty, 1.0, l)
    return jnp.where(empty[:, None], 0.0, o / safe[:, None]), jnp.where(empty, 0.0, m + jnp.log(safe))


def dq_step(dq, q, k, v, do, lse, delta, mask, scale):
    """One key tile of ``dq += dS K`` (unscaled), ``dS = P * (dO V^T - delta)``; lse / delta ``[t]``."""
    p = jnp.where(mask, jnp.exp(dot(q, k, trans_b=True) * scale - lse[:, None]), 0.0)
    ds = p * (dot(do, v, trans_b=True) - delta[:, None])
    return dq + dot(ds.astype(k.dtype), k)


def dkv_step(carry, q, k, v, do, lse, delta, mask, scale):
    """One query tile of ``dk += dS^T Q`` (unscaled), ``dv += P^T dO``; ``carry = (dk, dv)`` float32."""
    dk, dv = carry
    p = jnp.where(mask, jnp.exp(dot(q, k, trans_b=True) * scale - lse[:, None]), 0.0)  # [t, s]
    dv = dv + dot(p.T.astype(do.dtype), do)
    ds = p * (dot(do, v, trans_b=True) - delta[:, None])
    return dk + dot(ds.T.astype(q.dtype), q), dv


def softmax_init_refs(acc_ref, m_ref, l_ref):
    """Empty online-softmax state in VMEM scratch (TPU kernels): ``acc [t, H]``, ``m``, ``l [t, 1]`` float32."""
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)
    m_ref[...] = jnp.full(m_ref.shape, MASKED, jnp.float32)
    l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)


def softmax_step_refs(acc_ref, m_ref, l_ref, q, k, v, mask, scale):
    """``softmax_step`` on VMEM scratch refs (TPU kernels; statistics as ``[t, 1]`` columns)."""
    s = jnp.where(mask, dot(q, k, trans_b=True) * scale, MASKED)  # [t, s]
    m = m_ref[...]
    m_new = jnp.maximum(m, s.max(axis=1, keepdims=True))
    p = jnp.where(mask, jnp.exp(s - m_new), 0.0)
    corr = jnp.exp(m - m_new)
    acc_ref[...] = acc_ref[...] * corr + dot(p.astype(v.dtype), v)
    l_ref[...] = l_ref[...] * corr + p.sum(axis=1, keepdims=True)
    m_ref[...] = m_new


def softmax_finish_refs(acc_ref, m_ref, l_ref, o_ref, lse_ref):
    """``softmax_finish`` from VMEM scratch refs into the output refs (rows that saw no key: 0 and lse 0)."""
    l = l_ref[...]
    empty = l == 0.0
    safe = jnp.where(empty, 1.0, l)
    o_ref[...] = jnp.where(empty, 0.0, acc_ref[...] / safe).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(empty, 0.0, m_ref[...] + jnp.log(safe))
