"""Interventions: kinds of edits to the forward pass, as plug-ins.

Built-in kinds (the paper's clamps) live in `builtin`; a researcher adds a kind by
subclassing `Intervention` and calling `register` (see README, "Writing your own
intervention"). Conditions (spec strings -> leaves, stacking, static plans) are in
ih_jax.clamps.
"""

from ih_jax.interventions import builtin  # registers the built-in kinds
from ih_jax.interventions.core import (SITES, Draft, EditContext, Intervention, PassTools,
                                       get, head_name, parse_heads, parse_strength, register,
                                       registered, unregister)

__all__ = ["SITES", "Draft", "EditContext", "Intervention", "PassTools", "builtin", "get",
           "head_name", "parse_heads", "parse_strength", "register", "registered",
           "unregister"]
