"""Pallas kernels (GPU + TPU) for spb2_jax; each kernel module sits next to the pure-JAX path it must equal.

Kernels arrive with the kernel issue; this package depends only on jax.
"""
