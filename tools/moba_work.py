"""Counts (not a timing, runs anywhere): the attention work of the MoBA algorithms on random inputs.

    python tools/moba_work.py                      # T = 8k, 32k, 128k; MoBA 512/4 and 4096/12; tile 128
    python tools/moba_work.py --lens 8192 --heads 2

For each T and (C, topk): the (query, key) pairs the kernels compute, as a fraction of dense causal attention's
``T (T + 1) / 2``:
- ``union``: the query-major kernel visits, per query tile, every key tile in the union of its tokens' own and
  selected blocks (``moba_tile_lists`` counts) — ``tile * tile`` pairs per visit;
- ``gathered``: part A's band (own block, ``own_block_lists`` counts) plus one ``tile x tile`` pair block per
  (row tile, key tile of its block) of part B (``selected_block_rows``);
- ``XLA union``: the ``algorithm="union"`` tile loop of ``moba_blockwise`` (the XLA default before the gathered
  form): per query tile, every key tile that any token of any head of the tile needs (``needed_tiles``), computed
  for all heads;
- ``XLA gathered``: ``spb2_jax.ops.moba_gathered``: part A's fixed band of ``W`` key tiles per query tile
  (``W tile`` keys, ``W = ceil((C - 1) / tile) + 1``) plus ``C`` keys for every row of part B's
  ``row_capacity`` row tiles (all of them: the per-head tile skip becomes a select under ``vmap``);
- ``TPU gathered``: ``pallas_kernels.moba_gathered_tpu``: part A's band as ``gathered``, part B one ``tile x kb``
  block per (row tile, key tile of ``kb = C`` rounded up to the tile that its block touches: one or two);
- ``needed``: the pairs MoBA's mask keeps (own block causal + ``C`` per valid selected block).
With ``--smem``, a second table: the scalar-prefetched (SMEM) bytes of the largest single TPU kernel call, union
vs gathered, at 32 query / 8 kv heads (the 5B shape), batch 1, from the lists' shapes (``tests/
test_pallas_lowering.py`` records the same numbers from the lowered calls at T = 131,072).
Selections come from ``moba_select_blocks`` on standard-normal q, k (one kv head; per-head statistics do not
depend on the head count, so a few heads suffice).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
from tqdm import tqdm

from pallas_kernels.moba import moba_tile_lists
from pallas_kernels.moba_gathered import own_block_lists, row_capacity, selected_block_rows
from pallas_kernels.moba_gathered_tpu import key_tile, metadata_bytes
from spb2_jax.ops.moba_blockwise import moba_select_blocks, needed_tiles, segment_bounds
from spb2_jax.ops.segments import Segments


def work(T, C, topk, heads, tile, D=128):
    """``(union, gathered, XLA union, XLA gathered, TPU gathered, needed)`` pairs per head, averaged over
    ``heads``."""
    ks = jax.random.split(jax.random.key(T + C), 2)
    q = jax.random.normal(ks[0], (1, T, heads, D), jnp.float32)
    k = jax.random.normal(ks[1], (1, T, 1, D), jnp.float32)
    seg = jnp.ones((1, T), jnp.int32)
    pos = jnp.arange(T, dtype=jnp.int32)[None]
    sel = jax.jit(lambda q, k: moba_select_blocks(q, k, chunk_size=C, topk=topk, segment_ids=seg))(q, k)

    @jax.jit
    def count(sel):
        union = moba_tile_lists(sel, seg, pos, C, tile)[1].sum()
        band = own_block_lists(seg, pos, C, tile, heads)[1].sum()
        sr = selected_block_rows(sel, seg, pos, C, tile)
        used = sr.tile_lo < T
        spans = jnp.where(used, (sr.tile_lo + C - 1) // tile - sr.tile_lo // tile + 1, 0).sum()
        kb = key_tile(C, tile)
        tpu_spans = jnp.where(used, (sr.tile_hi - 1) // kb - sr.tile_lo // kb + 1, 0).sum() * (kb // tile)
        valid = jnp.sum(sel >= 0)
        segs = Segments(ids=seg, labels=seg, positions=pos)
        start, end = segment_bounds(segs)
        xla_union = needed_tiles(sel, pos // C, start, end, seg != 0, C, tile, T // tile).sum()
        return union, band + spans, valid, xla_union, band + tpu_spans

    union, gathered, valid, xla_union, tpu = (float(x) for x in count(sel))
    nT, R = T // tile, topk - 1
    W = min(nT, -(-(C - 1) // tile) + 1)
    xla_gathered = nT * tile * W * tile + (row_capacity(T, R, C, tile) * tile * C if R else 0)
    own = sum(min(C, T - b) * (min(C, T - b) + 1) / 2 for b in range(0, T, C))  # own block, causal
    per_visit = tile * tile / heads
    return (union * per_visit, gathered * per_visit, xla_union * tile * tile, xla_gathered, tpu * per_visit,
            valid * C / heads + own)


def smem_bytes(T, C, topk, tile, heads=32, kv_heads=8):
    """Largest scalar-prefetched operand set of one TPU call: ``(union, gathered)`` bytes (batch 1)."""
    nT = T // tile
    union = 4 * (heads * nT * nT + heads * nT)  # lists [1, N, nT, nT] + counts
    W = min(nT, -(-(C - 1) // tile) + 1)
    part_a = 4 * (nT * W + nT)  # own-block lists shared by the heads + counts
    part_b = metadata_bytes(T, heads // kv_heads, row_capacity(T, topk - 1, C, tile), C, tile)
    return union, max(part_a, *part_b.values())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lens", default="8192,32768,131072")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--tile", type=int, default=128)
    p.add_argument("--smem", action="store_true", help="also the TPU kernels' SMEM bytes (arithmetic, instant)")
    args = p.parse_args(argv)
    lens = [int(x) for x in args.lens.split(",")]
    print("| T | MoBA C/topk | union kernel / causal | gathered kernel / causal | XLA union / causal "
          "| XLA gathered / causal | TPU gathered / causal | needed / causal |")
    print("|---|---|---|---|---|---|---|---|")
    for T in tqdm(lens, desc="T", leave=False):
        for C, topk in ((512, 4), (4096, 12)):
            causal = T * (T + 1) / 2
            u, g, xu, xg, tg, n = work(T, C, topk, args.heads, args.tile)
            print(f"| {T} | {C}/{topk} | {u / causal:.3f} | {g / causal:.3f} | {xu / causal:.3f} | {xg / causal:.3f} "
                  f"| {tg / causal:.3f} | {n / causal:.3f} |", flush=True)
    if args.smem:
        print("\n| T | MoBA C/topk | TPU union: SMEM of one call | TPU gathered: largest SMEM of one call |")
        print("|---|---|---:|---:|")
        for T in lens:
            for C, topk in ((512, 4), (4096, 12)):
                union, gathered = smem_bytes(T, C, topk, args.tile)
                print(f"| {T} | {C}/{topk} | {union:,} | {gathered:,} |")


if __name__ == "__main__":
    main()
