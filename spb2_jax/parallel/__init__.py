"""Sharding: the logical-axis rules table (``rules``); meshes and sequence parallelism build on it."""

from spb2_jax.parallel.rules import MESH_AXES, RULES, constrain, mesh_axes_of, use_rules

__all__ = ["MESH_AXES", "RULES", "constrain", "mesh_axes_of", "use_rules"]
