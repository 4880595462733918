"""Levels: the kinds of components a decomposed pass can carry. Each implements the `Level`
protocol (tl_depass.levels.base): it checks itself against the model, names the hooks it reads,
and gives its groups of components, with structured labels (`Label`) and where each enters the
residual stream (see docs/architecture.md). A new level is one file."""

from tl_depass.levels.base import Entry, Group, Level
from tl_depass.levels.label import Label
from tl_depass.levels.params import ParamComponents
from tl_depass.levels.splits import SAEFeatures, Split, Subspace
from tl_depass.levels.tokens import TokensAt
from tl_depass.levels.units import Heads, MLPByPosition, Modules, Neurons

__all__ = ["Entry", "Group", "Heads", "Label", "Level", "MLPByPosition", "Modules", "Neurons",
           "ParamComponents", "SAEFeatures", "Split", "Subspace", "TokensAt"]
