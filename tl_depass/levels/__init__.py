"""Levels: the kinds of components a decomposed pass can carry. Each level says which groups of
components it has and where each enters the residual stream (see docs/architecture.md)."""

from tl_depass.levels.components import Split, TokensAt
from tl_depass.levels.params import ParamComponents
from tl_depass.levels.units import Heads, Modules, Neurons, SAEFeatures, Subspace

__all__ = ["Heads", "Modules", "Neurons", "ParamComponents", "SAEFeatures", "Split", "Subspace", "TokensAt"]
