"""Where parameters live on a mesh: the logical axis names of every parameter (``spb2_jax.model.logical_axes``)
mapped by the rules table (``spb2_jax.parallel.rules.RULES``) to ``NamedSharding`` s of the mesh."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax

from spb2_jax.config import SpB2Config
from spb2_jax.model import logical_axes
from spb2_jax.parallel.rules import RULES


def param_shardings(config: SpB2Config, mesh: jax.sharding.Mesh, rules=RULES) -> Any:
    """The params tree of ``config`` with a ``NamedSharding`` of ``mesh`` at every leaf (embedding dims over
    ``fsdp``, heads / MLP features / vocabulary over ``tensor``; the rest replicated)."""
    return nn.logical_to_mesh_sharding(logical_axes(config), mesh, rules)


def place_params(params: Any, config: SpB2Config, mesh: jax.sharding.Mesh) -> Any:
    """``params`` (e.g. from ``init_params``) moved onto their shards of ``mesh``."""
    return jax.device_put(params, param_shardings(config, mesh))
