"""Pallas kernels: GPU-style (Triton lowering) and TPU-style (Mosaic TPU) twins. The caller picks them: every
public wrapper takes ``target`` (``"triton"`` or ``"mosaic_tpu"``) and ``interpret`` as required keywords, and
nothing here looks at the backend; CPU runs either with ``interpret=True`` (tests). Depends only on jax.

- ``platform``: the targets (``TARGETS``, ``check_target``) and their compiler parameters.
- ``block_sparse_flash``: the shared block-sparse flash-attention core (forward, dQ, dK/dV kernels), GPU style,
  and its entry points ``block_sparse_attention`` / ``forward`` / ``backward``, which dispatch on ``target``;
  ``block_sparse_flash_tpu``: its TPU-style twin (scalar-prefetched tile lists drive the grid);
  ``_flash_common``: what both share (the per-token mask, the float32 matmul, the online-softmax / dQ / dK-dV
  tile steps).
- ``moba``: MoBA attention: ``algorithm="union"`` on that core (per query tile, the union of its tokens' selected
  tiles) or ``"gathered"`` (``moba_gathered``: own-block band + (token, selected block) rows grouped by block).
- ``sliding_window``: sliding-window attention on that core (a band of key tiles per query tile).
- ``gated_delta_rule`` / ``gated_delta_rule_tpu``: the chunked gated-delta-rule forward (GPU / TPU style).
"""

from pallas_kernels.moba import moba_flash_attention
from pallas_kernels.sliding_window import causal_flash_attention, sliding_window_flash_attention

__all__ = ["causal_flash_attention", "moba_flash_attention", "sliding_window_flash_attention"]
