"""The Level protocol: what every kind of component (tokens, heads, neurons, a split, a level of
your own) tells the engine. A new level is one class with three methods:

    check(model) -> Level                  everything checkable before the clean run
    reads(model) -> list[str]              hooks whose clean values `groups` reads (beyond the
                                           frozen inputs and the residual stream, always recorded)
    groups(model, clean, tokens) -> list[Group]
                                           the components, each group's structured labels and
                                           where its components enter (Entry: hook and states)

Several groups (one per layer for heads, say) ride in one folded forward: they must have the same
number of components. Each group's last component is its bias; its shares of every activation
sum to the clean activation.
"""

from typing import Protocol, runtime_checkable

from jaxtyping import Int
from torch import Tensor

from tl_depass.engine import hooks
from tl_depass.engine.backends import Model
from tl_depass.engine.clean_run import CleanRun
from tl_depass.engine.groups import Entry, Group, Label, stored  # noqa: F401 (the levels' vocabulary)


@runtime_checkable
class Level(Protocol):
    """A kind of component `decompose` can carry (see the module docstring)."""

    def check(self, model: Model) -> "Level":
        """This level, checked against `model` (canonical hook names); DepassError if it does not
        fit the model."""
        ...

    def reads(self, model: Model) -> list[str]:
        """The hooks whose clean values `groups` reads."""
        ...

    def groups(self, model: Model, clean: CleanRun, tokens: Int[Tensor, "batch pos"]) -> list[Group]:
        """The groups of components and where they enter, from the clean run."""
        ...


# Optional, for the memory estimate before the clean run: `size(model, pos) -> (groups,
# components per group without the bias, exact)`. A level without it (or one whose count the
# clean run decides) is estimated from a lower bound, checked again once the groups are built.
Size = tuple[int, int, bool]


def one_hot_rows(n: int, offset: int, k: int, fill: dict[int, Tensor], like: Tensor) -> Tensor:
    """Rows offset..offset+k of an n-row stack that is `fill[row]` where given, zero elsewhere."""
    out = like.new_zeros((k, *like.shape))
    for row, value in fill.items():
        if offset <= row < offset + k:
            out[row - offset] = value
    return out


def rest_entry(clean: CleanRun, layer: int) -> Entry:
    """Before layer `layer`, the group's first component ("rest") is the whole clean residual."""
    resid = clean[hooks.resid_pre(layer)]
    return Entry(hooks.resid_pre(layer), lambda offset, k: one_hot_rows(0, offset, k, {0: resid}, resid),
                 rest=True)


def around(layer: int, parts: list[Label]) -> list[Label]:
    """A layer's group: "L{layer} rest" (the residual before it), `parts`, "L{layer} bias"."""
    return [Label(f"L{layer} rest", "rest", layer), *parts, Label(f"L{layer} bias", "bias", layer)]
