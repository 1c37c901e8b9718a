"""Sharding: meshes (``mesh``), the logical-axis rules table (``rules``) and the sequence-parallel token mixers
(``sequence``, chosen by ``ModelOptions`` through ``spb2_jax.ops.dispatch``)."""

from spb2_jax.parallel.mesh import initialize_distributed, make_mesh, parse_mesh_spec, token_sharding
from spb2_jax.parallel.rules import MESH_AXES, RULES, constrain, mesh_axes_of, use_rules

__all__ = ["MESH_AXES", "RULES", "constrain", "initialize_distributed", "make_mesh", "mesh_axes_of",
           "parse_mesh_spec", "token_sharding", "use_rules"]
