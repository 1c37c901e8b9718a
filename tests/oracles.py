"""Float64 NumPy oracles for the reference ops, written from DESIGN.md and the official semantics.

Deliberately independent of ``spb2_jax``: plain loops over batch rows, segments, heads and tokens, no
vectorised masks, no shared helpers with the JAX code. Everything is computed in float64; inputs are cast.

Shapes follow DESIGN.md: q, k ``[B, T, H, K]``; v ``[B, T, H, V]``; per-head gates ``[B, T, H]``; GLA gates
``[B, T, H, K]``; states ``[B, H, K, V]`` (SSE: ``[B, 1 + N, H, K, V]``); ``segment_ids [B, T]`` with 0 = padding.

Segments: a row is cut into *segments*, the maximal runs of consecutive tokens with the same nonzero id
(padding, id 0, belongs to no segment and ends the run; ``[1, 1, 0, 1]`` is two segments). This is the
contract of ``spb2_jax/ops/segments.py`` and equals ``cu_seqlens`` in the official code for packed rows with
left/right padding.
"""

from __future__ import annotations

import math

import numpy as np

F64 = np.float64


def _f64(x):
    return None if x is None else np.asarray(x, dtype=F64)


def _default_segments(B: int, T: int, segment_ids):
    return np.ones((B, T), np.int64) if segment_ids is None else np.asarray(segment_ids)


def segments_of_row(seg_row) -> list[np.ndarray]:
    """Token indices of each segment of one row, in order (see module docstring)."""
    groups: list[list[int]] = []
    prev = 0
    for t, s in enumerate(np.asarray(seg_row).tolist()):
        if s != 0:
            if s != prev:
                groups.append([])
            groups[-1].append(t)
        prev = s
    return [np.asarray(g, dtype=np.int64) for g in groups]


# ----------------------------------------------------------------------------------------------- norms, rope
def rms_norm(x, weight, eps):
    """``x / sqrt(mean(x^2) + eps) * weight`` over the last axis."""
    x = _f64(x)
    y = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)
    return y if weight is None else y * _f64(weight)


def silu(x):
    x = _f64(x)
    return x / (1.0 + np.exp(-x))


def gated_rms_norm(x, gate, weight, eps):
    """fla ``FusedRMSNormGated`` (swish): ``rms_norm(x, weight) * silu(gate)``."""
    return rms_norm(x, weight, eps) * silu(gate)


def l2norm(x, eps=1e-6):
    """fla ``l2norm``: ``x / sqrt(sum(x^2) + eps)`` (eps inside the square root)."""
    x = _f64(x)
    return x / np.sqrt(np.sum(x * x, axis=-1, keepdims=True) + eps)


def segment_positions(segment_ids):
    """Position of each real token inside its segment (0 at the segment's first token); padding gets 0."""
    seg = np.asarray(segment_ids)
    pos = np.zeros(seg.shape, np.int64)
    for b in range(seg.shape[0]):
        for idx in segments_of_row(seg[b]):
            pos[b, idx] = np.arange(len(idx))
    return pos


def rope(x, positions, theta):
    """NeoX "rotate half" RoPE over the whole head dim: pair (d, d + H/2) rotated by pos * theta^(-2d/H)."""
    x = _f64(x)
    B, T, N, H = x.shape
    half = H // 2
    out = np.empty_like(x)
    for b in range(B):
        for t in range(T):
            pos = float(positions[b, t])
            for d in range(half):
                ang = pos * theta ** (-2.0 * d / H)
                c, s = math.cos(ang), math.sin(ang)
                x1, x2 = x[b, t, :, d], x[b, t, :, d + half]
                out[b, t, :, d] = x1 * c - x2 * s
                out[b, t, :, d + half] = x2 * c + x1 * s
    return out


# ----------------------------------------------------------------------------------------------- attention
def _softmax_rows_attend(qv, keys, vals, scale):
    """One query vector against the visible keys ``[S, H]``: softmax(q.k * scale) @ v (zeros if none)."""
    if len(keys) == 0:
        return np.zeros(vals.shape[-1], F64)
    logits = keys @ qv * scale
    w = np.exp(logits - logits.max())
    w /= w.sum()
    return w @ vals


def attention(q, k, v, segment_ids=None, causal=True, window=None, scale=None):
    """Masked GQA softmax attention; query head n uses kv head ``n // (N // K)``.

    Query i sees key j iff both are real tokens of the same segment (``segments_of_row``), (causal) j <= i,
    and (window) i - window < j. A query with no visible key (padding) outputs zeros.
    """
    q, k, v = _f64(q), _f64(k), _f64(v)
    B, T, N, H = q.shape
    S, KV = k.shape[1], k.shape[2]
    G = N // KV
    scale = H ** -0.5 if scale is None else scale
    seg = _default_segments(B, T, segment_ids)
    out = np.zeros((B, T, N, v.shape[-1]), F64)
    for b in range(B):
        which = np.full(T, -1)
        for si, idx in enumerate(segments_of_row(seg[b])):
            which[idx] = si
        for i in range(T):
            if seg[b, i] == 0:
                continue
            vis = [j for j in range(S)
                   if which[j] == which[i]
                   and (not causal or j <= i)
                   and (window is None or i - window < j)]
            for n in range(N):
                kv = n // G
                out[b, i, n] = _softmax_rows_attend(q[b, i, n], k[b, vis, kv], v[b, vis, kv], scale)
    return out


def moba_selected_blocks(q, k, chunk_size, topk, segment_ids=None):
    """Per official naive MoBA: ``sel[b][n][t] = set of block indices`` (within t's segment) query t attends.

    Blocks are ``chunk_size`` tokens from the segment start; gate_j = q . mean(k in block j) (kv head of n);
    the own block always, plus the top-(topk - 1) strictly earlier blocks by gate.
    """
    q, k = _f64(q), _f64(k)
    B, T, N, H = q.shape
    G = N // k.shape[2]
    seg = _default_segments(B, T, segment_ids)
    sel = [[[set() for _ in range(T)] for _ in range(N)] for _ in range(B)]
    for b in range(B):
        for idx in segments_of_row(seg[b]):
            L = len(idx)
            nblk = -(-L // chunk_size)
            for n in range(N):
                kv = n // G
                means = [k[b, idx[j * chunk_size:(j + 1) * chunk_size], kv].mean(axis=0) for j in range(nblk)]
                for s in range(L):
                    own = s // chunk_size
                    gates = [(float(q[b, idx[s], n] @ means[j]), j) for j in range(own)]
                    gates.sort(key=lambda gj: -gj[0])
                    chosen = {own} | {j for _, j in gates[:max(topk - 1, 0)]}
                    sel[b][n][idx[s]] = chosen
    return sel


def moba_attention(q, k, v, chunk_size, topk, segment_ids=None, scale=None):
    """MoBA: causal attention of each query (per head) restricted to the keys in its selected blocks."""
    q, k, v = _f64(q), _f64(k), _f64(v)
    B, T, N, H = q.shape
    G = N // k.shape[2]
    scale = H ** -0.5 if scale is None else scale
    seg = _default_segments(B, T, segment_ids)
    sel = moba_selected_blocks(q, k, chunk_size, topk, segment_ids)
    out = np.zeros((B, T, N, v.shape[-1]), F64)
    for b in range(B):
        for idx in segments_of_row(seg[b]):
            for s in range(len(idx)):
                for n in range(N):
                    kv = n // G
                    vis = [idx[j] for j in range(s + 1) if j // chunk_size in sel[b][n][idx[s]]]
                    out[b, idx[s], n] = _softmax_rows_attend(q[b, idx[s], n], k[b, vis, kv], v[b, vis, kv], scale)
    return out


# ----------------------------------------------------------------------------------------------- recurrences
def gdn_step(S, q, k, v, g, beta, scale):
    """One gated-delta-rule token for one head. S ``[K, V]``; q, k ``[K]`` (already normalised); v ``[V]``."""
    S = S * math.exp(g)
    u = beta * (v - S.T @ k)
    S = S + np.outer(k, u)
    return S, S.T @ (q * scale)


def gla_step(S, q, k, v, gk, scale):
    """One GLA token for one head: ``S <- diag(exp(gk)) S + k v^T; o = S^T (q * scale)``."""
    S = np.exp(gk)[:, None] * S + np.outer(k, v)
    return S, S.T @ (q * scale)


def _run_tokens(step, S0, inputs):
    """Apply ``step(S, *x_t)`` over a list of per-token input tuples; returns (outputs list, final S)."""
    S = S0.copy()
    outs = []
    for x in inputs:
        S, o = step(S, *x)
        outs.append(o)
    return outs, S


def _token_loop(step_fn, per_token, B, T, H, K, V, initial_state, segment_ids):
    """Per-token loop with the segment rule of DESIGN / segments.py: padding is a no-op with zero output; the
    state resets to zero at every segment start (see ``segments_of_row``) except the row's first segment."""
    seg = _default_segments(B, T, segment_ids)
    out = np.zeros((B, T, H, V), F64)
    final = np.zeros((B, H, K, V), F64)
    for b in range(B):
        starts = {int(idx[0]) for idx in segments_of_row(seg[b])[1:]}
        for h in range(H):
            S = np.zeros((K, V), F64) if initial_state is None else _f64(initial_state)[b, h].copy()
            for t in range(T):
                if seg[b, t] == 0:
                    continue
                if t in starts:
                    S = np.zeros((K, V), F64)
                S, out[b, t, h] = step_fn(S, *per_token(b, t, h))
            final[b, h] = S
    return out, final


def gated_delta_rule(q, k, v, g, beta, scale=None, initial_state=None, segment_ids=None, use_qk_l2norm=True):
    """Gated delta rule, token by token (fla ``naive_recurrent``): returns (o ``[B, T, H, V]``, S ``[B, H, K, V]``)."""
    q, k, v, g, beta = map(_f64, (q, k, v, g, beta))
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = K ** -0.5 if scale is None else scale
    if use_qk_l2norm:
        q, k = l2norm(q), l2norm(k)

    def per_token(b, t, h):
        return q[b, t, h], k[b, t, h], v[b, t, h], g[b, t, h], beta[b, t, h], scale

    return _token_loop(gdn_step, per_token, B, T, H, K, V, initial_state, segment_ids)


def gla(q, k, v, gk, scale=None, initial_state=None, segment_ids=None):
    """GLA with per-key log gates, token by token: returns (o ``[B, T, H, V]``, S ``[B, H, K, V]``)."""
    q, k, v, gk = map(_f64, (q, k, v, gk))
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = K ** -0.5 if scale is None else scale

    def per_token(b, t, h):
        return q[b, t, h], k[b, t, h], v[b, t, h], gk[b, t, h], scale

    return _token_loop(gla_step, per_token, B, T, H, K, V, initial_state, segment_ids)


# ----------------------------------------------------------------------------------------------- SSE
def topk_mask(p, k):
    """Top-k entries of each row of ``p`` over the last axis; ties broken towards the lower index
    (the threshold + cumsum rule of fla ``_fused_softmax_topk_fwd_kernel``)."""
    p = _f64(p)
    flat = p.reshape(-1, p.shape[-1])
    out = np.zeros(flat.shape, bool)
    for r, row in enumerate(flat):
        order = sorted(range(len(row)), key=lambda n: (-row[n], n))
        out[r, order[:k]] = True
    return out.reshape(p.shape)


def softmax(x, axis=-1):
    x = _f64(x)
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def sse_route(logits, num_writer, num_reader):
    p = softmax(logits)
    return p, topk_mask(p, num_writer), topk_mask(p, num_reader)


def sse_aux_loss(p, write, valid, num_writer):
    """``N / num_writer * sum_n mean_tok(p_n) * mean_tok(write_n)`` over the valid tokens."""
    p, write, valid = _f64(p), np.asarray(write, F64), np.asarray(valid, bool)
    P = p[valid]
    W = write[valid]
    if len(P) == 0:
        return 0.0
    return float(np.sum(P.mean(0) * W.mean(0)) * p.shape[-1] / num_writer)


def _make_sse_step(kind, scale):
    """(step, normalise) for one head of the sparse/shared recurrences; GDN normalises q, k with l2norm
    *after* the router scaling (``use_qk_l2norm_in_kernel`` sees q * p and k * p)."""
    if kind == "gdn":
        def step(S, q, k, v, gate, beta):
            return gdn_step(S, l2norm(q), l2norm(k), v, gate, beta, scale)
    else:
        def step(S, q, k, v, gate, beta):
            return gla_step(S, q, k, v, gate, scale)
    return step


def sse_varlen(kind, q1, k1, q2, k2, v, gate, p, write, beta=None, segment_ids=None, initial_state=None):
    """Official varlen SSE (``sort_along_l``), literally: per (row, segment, partition) GATHER the tokens that
    write to the partition, run the recurrence on just those with ``q2 * p_n``, ``k2 * p_n``, then
    scatter-add the partition outputs back onto the tokens; plus the shared recurrence over all tokens.

    Args:
      kind: ``"gdn"`` or ``"gla"``.
      gate: GDN ``g [B, T, 2, H]`` / GLA ``gk [B, T, 2, H, K]`` (index 0 shared, 1 sparse).
      beta: GDN only, ``[B, T, 2, H]``.
      p ``[B, T, N]`` router probabilities; write ``[B, T, N]`` bool.
      initial_state: ``[B, 1 + N, H, K, V]`` (applies to the first segment of each row).
    Returns:
      o ``[B, T, H, V]``, final states ``[B, 1 + N, H, K, V]``.
    """
    q1, k1, q2, k2, v, gate, p = map(_f64, (q1, k1, q2, k2, v, gate, p))
    beta = np.zeros(gate.shape[:4]) if beta is None else _f64(beta)
    write = np.asarray(write, bool)
    B, T, H, K = q1.shape
    V, N = v.shape[-1], p.shape[-1]
    scale = K ** -0.5
    step = _make_sse_step(kind, scale)
    seg = _default_segments(B, T, segment_ids)
    out = np.zeros((B, T, H, V), F64)
    final = np.zeros((B, 1 + N, H, K, V), F64)
    for b in range(B):
        states = (np.zeros((1 + N, H, K, V)) if initial_state is None else _f64(initial_state)[b].copy())
        for si, idx in enumerate(segments_of_row(seg[b])):
            if si > 0:
                states = np.zeros((1 + N, H, K, V))  # every segment (cu_seqlens sample) starts from zero
            # shared branch: all tokens of the segment
            for h in range(H):
                inputs = [(q1[b, t, h], k1[b, t, h], v[b, t, h], gate[b, t, 0, h], beta[b, t, 0, h]) for t in idx]
                outs, states[0, h] = _run_tokens(step, states[0, h], inputs)
                for t, o in zip(idx, outs):
                    out[b, t, h] += o
            # sparse branch: gather the writers of each partition, recurrence, scatter-add back
            for n in range(N):
                gathered = idx[write[b, idx, n]]
                for h in range(H):
                    inputs = [(q2[b, t, h] * p[b, t, n], k2[b, t, h] * p[b, t, n], v[b, t, h],
                               gate[b, t, 1, h], beta[b, t, 1, h]) for t in gathered]
                    outs, states[1 + n, h] = _run_tokens(step, states[1 + n, h], inputs)
                    contrib = np.zeros((T, V))
                    np.add.at(contrib, gathered, np.asarray(outs).reshape(len(gathered), V))
                    out[b, :, h] += contrib
        final[b] = states
    return out, final


def sse_mask(kind, q1, k1, q2, k2, v, gate, p, write, read, beta=None, segment_ids=None, initial_state=None,
             gdn_gate_mask="read"):
    """Official mask-form SSE (``softmax_and_mask``), literally: every partition runs over every token with
    ``q2 * p * read``, ``k2 * p * write``, ``v * write``; GLA ``gk * write``; GDN ``g * read``, ``beta * read``
    (the official quirk). Output = shared + sum over partitions. Arguments as in ``sse_varlen`` plus ``read``;
    ``gdn_gate_mask="write"`` gives the non-quirk variant (GDN g, beta gated by the write mask), for tests
    that document the quirk."""
    q1, k1, q2, k2, v, gate, p = map(_f64, (q1, k1, q2, k2, v, gate, p))
    write, read = np.asarray(write, F64), np.asarray(read, F64)
    B, T, H, K = q1.shape
    V, N = v.shape[-1], p.shape[-1]
    init = None if initial_state is None else _f64(initial_state)
    if kind == "gdn":
        beta = _f64(beta)
        o, S0 = gated_delta_rule(q1, k1, v, gate[:, :, 0], beta[:, :, 0],
                                 initial_state=None if init is None else init[:, 0], segment_ids=segment_ids)
    else:
        o, S0 = gla(q1, k1, v, gate[:, :, 0], initial_state=None if init is None else init[:, 0],
                    segment_ids=segment_ids)
    final = np.zeros((B, 1 + N, H, K, V))
    final[:, 0] = S0
    for n in range(N):
        pr, pw = p[..., n] * read[..., n], p[..., n] * write[..., n]  # [B, T]
        qn = q2 * pr[..., None, None]
        kn = k2 * pw[..., None, None]
        vn = v * write[..., n][..., None, None]
        st = None if init is None else init[:, 1 + n]
        if kind == "gdn":
            gm = (read if gdn_gate_mask == "read" else write)[..., n][..., None]
            gn = gate[:, :, 1] * gm
            bn = beta[:, :, 1] * gm
            on, Sn = gated_delta_rule(qn, kn, vn, gn, bn, initial_state=st, segment_ids=segment_ids)
        else:
            gn = gate[:, :, 1] * write[..., n][..., None, None]
            on, Sn = gla(qn, kn, vn, gn, initial_state=st, segment_ids=segment_ids)
        o = o + on
        final[:, 1 + n] = Sn
    return o, final
