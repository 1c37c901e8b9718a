"""Pallas kernels (GPU via Triton lowering; CPU with ``interpret=True`` for tests). Depends only on jax.

- ``block_sparse_flash``: the shared block-sparse flash-attention core (forward, dQ, dK/dV kernels).
- ``moba``: MoBA attention on that core (per-token selected blocks, tile lists from the selection).
- ``sliding_window``: sliding-window attention on that core (a band of key tiles per query tile).
"""

from pallas_kernels.moba import moba_flash_attention
from pallas_kernels.sliding_window import causal_flash_attention, sliding_window_flash_attention

__all__ = ["causal_flash_attention", "moba_flash_attention", "sliding_window_flash_attention"]
