"""Positions of the VL model, computed on the host from the image grids (their shapes fix the program's shapes).

Vision tower (per patch, in ``pixel_values`` row order, i.e. merge windows contiguous):

- ``pos_embed_lookup``: the learned ``S x S`` position grid interpolated bilinearly to each image's ``h x w``
  patches (grid coordinates ``linspace(0, S - 1, h)`` x ``linspace(0, S - 1, w)``): 4 row indices and 4 weights
  per patch (floor/ceil corners; float32 weights as the official ``fast_pos_embed_interpolate``);
- ``rotary_positions``: each patch's (row, column) in its image (2-D rotary);
- ``frame_ids``: which frame a patch belongs to (attention stays inside a frame).

Text (``get_rope_index``, the official M-RoPE positions; per row over its real tokens): text tokens get
consecutive positions, equal in the three channels (t, h, w); an image block whose first token would be at ``p``
gets ``(p + t, p + i, p + j)`` over its merged ``t x (h / m) x (w / m)`` grid; the text after it resumes at the
block's largest position + 1. Pads get 1 in every channel; ``rope_deltas = max position + 1 - T`` (padded T) is
what cached decoding adds to a text token's index.

``mrope_angles``: the interleaved M-RoPE angles ``[B, T, head_dim / 2]``: frequency ``j`` reads channel h when
``j % 3 == 1`` and ``j < 3 * section[1]``, channel w when ``j % 3 == 2`` and ``j < 3 * section[2]``, else t.
"""

from __future__ import annotations

import numpy as np

from spb2_jax.vision.config import VisionConfig


def _grids(grid_thw) -> np.ndarray:
    g = np.asarray(grid_thw, np.int64).reshape(-1, 3)
    if (g <= 0).any():
        raise ValueError(f"image_grid_thw {g.tolist()}: every entry must be positive")
    return g


def _merge_order(a: np.ndarray, t: int, h: int, w: int, m: int) -> np.ndarray:
    """Per-patch values in raster order ``[t*h*w, ...]`` -> merge-window order ``(t, h/m, w/m, m, m)``."""
    a = a.reshape((t, h // m, m, w // m, m) + a.shape[1:])
    return a.transpose((0, 1, 3, 2, 4) + tuple(range(5, a.ndim))).reshape((t * h * w,) + a.shape[5:])


def pos_embed_lookup(grid_thw, config: VisionConfig) -> tuple[np.ndarray, np.ndarray]:
    """``(indices [N, 4] int32, weights [N, 4] float32)`` into the ``S x S`` position grid (module docstring)."""
    S, m = config.grid_side, config.spatial_merge_size
    idx_all, w_all = [], []
    for t, h, w in _grids(grid_thw):
        hs = np.linspace(0, S - 1, h, dtype=np.float32)
        ws = np.linspace(0, S - 1, w, dtype=np.float32)
        h0, w0 = hs.astype(np.int64), ws.astype(np.int64)
        h1, w1 = np.minimum(h0 + 1, S - 1), np.minimum(w0 + 1, S - 1)
        dh, dw = (hs - h0).astype(np.float32), (ws - w0).astype(np.float32)
        one = np.float32(1)
        idx = np.stack([(h0[:, None] * S + w0[None]), (h0[:, None] * S + w1[None]),
                        (h1[:, None] * S + w0[None]), (h1[:, None] * S + w1[None])], -1).reshape(h * w, 4)
        wt = np.stack([(one - dh)[:, None] * (one - dw)[None], (one - dh)[:, None] * dw[None],
                       dh[:, None] * (one - dw)[None], dh[:, None] * dw[None]], -1).reshape(h * w, 4)
        idx_all.append(_merge_order(np.tile(idx, (t, 1)), t, h, w, m))
        w_all.append(_merge_order(np.tile(wt, (t, 1)), t, h, w, m))
    return np.concatenate(idx_all).astype(np.int32), np.concatenate(w_all).astype(np.float32)


def rotary_positions(grid_thw, config: VisionConfig) -> np.ndarray:
    """``[N, 2] int32``: each patch's (row, column) inside its image, in merge-window order."""
    m = config.spatial_merge_size
    out = []
    for t, h, w in _grids(grid_thw):
        rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        rc = np.stack([rows, cols], -1).reshape(h * w, 2)
        out.append(_merge_order(np.tile(rc, (t, 1)), t, h, w, m))
    return np.concatenate(out).astype(np.int32)


def frame_ids(grid_thw) -> np.ndarray:
    """``[N] int32``: the frame (over all images, 0-based) of each patch; attention stays inside a frame."""
    g = _grids(grid_thw)
    return np.repeat(np.arange(int(g[:, 0].sum())), np.repeat(g[:, 1] * g[:, 2], g[:, 0])).astype(np.int32)


def vision_rotary_angles(positions: np.ndarray, head_dim: int, theta: float = 10000.0) -> np.ndarray:
    """``[N, head_dim / 2] float32``: ``[row * f, col * f]`` with ``f = theta^(-arange(0, d, 2) / d)``,
    ``d = head_dim / 2`` (the official ``rot_pos_emb``; cos / sin of ``cat(a, a)`` rotate the head)."""
    d = head_dim // 2
    inv_freq = (1.0 / (np.float32(theta) ** (np.arange(0, d, 2, dtype=np.float32) / np.float32(d)))).astype(
        np.float32)
    rows = positions[:, :1].astype(np.float32) * inv_freq
    cols = positions[:, 1:].astype(np.float32) * inv_freq
    return np.concatenate([rows, cols], -1).astype(np.float32)


def get_rope_index(input_ids, image_grid_thw, attention_mask=None, *, image_token_id: int,
                   vision_start_token_id: int, spatial_merge_size: int) -> tuple[np.ndarray, np.ndarray]:
    """``(position_ids [3, B, T] int64, rope_deltas [B, 1] int64)`` (module docstring). Images are consumed in
    row order; an image's ``<|image_pad|>`` run must hold exactly ``t * (h / m) * (w / m)`` tokens."""
    ids = np.asarray(input_ids, np.int64)
    if ids.ndim != 2:
        raise ValueError(f"input_ids must be [batch, time], got shape {list(ids.shape)}")
    B, T = ids.shape
    mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask, np.int64)
    grids = None if image_grid_thw is None else _grids(image_grid_thw)
    pos = np.ones((3, B, T), np.int64)
    deltas = np.zeros((B, 1), np.int64)
    image = 0
    m = spatial_merge_size
    for b in range(B):
        real = np.nonzero(mask[b] == 1)[0]
        toks = ids[b, real]
        parts, st, nxt = [], 0, 0
        starts = np.nonzero(toks[:-1] == vision_start_token_id)[0] + 1
        for s in starts:
            if toks[s] != image_token_id:
                continue
            if grids is None or image >= len(grids):
                raise ValueError(f"row {b} has more images than image_grid_thw's {0 if grids is None else len(grids)}")
            t, h, w = (int(v) for v in grids[image])
            image += 1
            gh, gw = h // m, w // m
            n = t * gh * gw
            run = toks[s:s + n]
            if len(run) != n or (run != image_token_id).any() or (s + n < len(toks) and toks[s + n] == image_token_id):
                raise ValueError(f"row {b}: image {image - 1} (grid {t}x{h}x{w}) needs exactly {n} <|image_pad|> "
                                 f"tokens (t x h/{m} x w/{m}), the prompt does not have that run")
            text_len = s - st
            parts.append(np.broadcast_to(np.arange(text_len) + nxt, (3, text_len)))
            ti, hi, wi = np.meshgrid(np.arange(t), np.arange(gh), np.arange(gw), indexing="ij")
            block = np.stack([ti.ravel(), hi.ravel(), wi.ravel()]) + text_len + nxt
            parts.append(block)
            nxt = int(block.max()) + 1
            st = s + n
        if st < len(toks):
            parts.append(np.broadcast_to(np.arange(len(toks) - st) + nxt, (3, len(toks) - st)))
        llm = np.concatenate(parts, axis=1) if parts else np.zeros((3, 0), np.int64)
        pos[:, b, real] = llm
        deltas[b, 0] = (int(llm.max()) + 1 if llm.size else 0) - T
    if grids is not None and image != len(grids):
        raise ValueError(f"image_grid_thw has {len(grids)} images but the prompts hold {image} image blocks")
    return pos, deltas


def mrope_angles(position_ids, head_dim: int, theta: float, section) -> np.ndarray:
    """Interleaved M-RoPE angles ``[B, T, head_dim / 2] float32`` from ``position_ids [3, B, T]`` (numpy; the
    model computes the same in jnp, ``spb2_jax.ops.rope.mrope_cos_sin``)."""
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    f = np.asarray(position_ids, np.float32)[..., None] * inv_freq.astype(np.float32)  # [3, B, T, H/2]
    return f[mrope_channels(head_dim, section), :, :, np.arange(head_dim // 2)].transpose(1, 2, 0)


def mrope_channels(head_dim: int, section) -> np.ndarray:
    """``[head_dim / 2] int``: the position channel (0 t, 1 h, 2 w) each rotary frequency reads."""
    j = np.arange(head_dim // 2)
    ch = np.zeros_like(j)
    ch[(j % 3 == 1) & (j < 3 * section[1])] = 1
    ch[(j % 3 == 2) & (j < 3 * section[2])] = 2
    return ch
