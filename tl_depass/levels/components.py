"""The `components=` argument of decompose, attribute and estimate_memory: "tokens" or a Level,
checked against the model once (for the forward and the backward path alike).

The building blocks that lived here (Entry, Group, stored, TokensAt, Split, token_labels, ...)
are now in tl_depass.levels.base, .tokens and .splits; they are still importable from here."""

from tl_depass.engine.backends import Model
from tl_depass.errors import DepassError
from tl_depass.levels.base import Entry, Group, Level, stored
from tl_depass.levels.splits import Split, split_states
from tl_depass.levels.tokens import PosEmbed, TokensAt, by_position, token_labels

__all__ = ["Entry", "Group", "Level", "PosEmbed", "Split", "TokensAt", "as_components", "by_position",
           "split_states", "stored", "token_labels"]

METHODS = ("check", "reads", "groups")


def as_components(components: object, model: Model) -> Level:
    """The level `components` names ("tokens": TokensAt(0)), checked against `model`."""
    if isinstance(components, type):
        raise DepassError(f"components must be an instance such as {components.__name__}(), "
                          "not the class")
    if isinstance(components, str) and components == "tokens":
        components = TokensAt(0)
    if isinstance(components, Level):
        return components.check(model)
    missing = [m for m in METHODS if not callable(getattr(components, m, None))]
    mine = "" if len(missing) == len(METHODS) else (
        f" (a level of your own also needs {', '.join(missing)}: see tl_depass.levels.Level)")
    raise DepassError(
        f"unknown components {components!r}{mine}; use 'tokens', tl_depass.TokensAt(layer), "
        "tl_depass.Split(hook, tensor), Heads(), Modules(), Neurons(layer), Subspace(hook, "
        "basis) or SAEFeatures(hook, sae)"
    )
