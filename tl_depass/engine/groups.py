"""Groups of components as the engine carries them: their structured labels and where they enter
the residual stream. Levels (tl_depass.levels) build them; the plan and the replay read them."""

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor


@dataclass(frozen=True)
class Label:
    """One component of a decomposition.

    `name` is the display string (`dec.labels`, e.g. "L3H7"); `kind` what it is:

        token, pos                  positions (TokensAt; index: the position), the position embedding
        head, attn, mlp, neuron     written at `layer` (index: head, neuron; MLPByPosition's "mlp"
                                    components: the position)
        part, subspace, feature     splits of one activation (index: part, basis, SAE feature);
        other features, b_dec, error    with the SAE's other features, decoder bias and error
        param, inactive, delta      parameter subcomponents (index: subcomponent) and the rest of
                                    the decomposed matrix's output
        rest, bias                  a group's rest (a layer's: the residual stream entering it) and
                                    its bias (always the group's last component)
        unknown                     loaded from a file saved before labels were structured

    `layer` is the block it is written in (None for splits of one activation); `index` as above
    (None where the kind has one per layer or group); `group` the group of components it belongs to
    (their shares sum to the clean activations)."""

    name: str
    kind: str
    layer: int | None = None
    index: int | None = None
    group: int = 0

    def __str__(self) -> str:
        return self.name


@dataclass
class Entry:
    """Where a group's components enter: at `hook`, component rows `offset .. offset+k` take
    `rows(offset, k)`, the group's bias slot takes `bias` (None: zero).

    `first(offset, k)`, where given: the first position at which those components can be
    non-zero. Before it their rows are exactly zero, and stay so at every later hook of a causal
    model (the frozen patterns carry nothing backwards; the rules give an exact zero nothing), so a
    chunk's forward may skip those positions (the token level: component p starts at p).

    `rest`: only the group's first component (its rest) is non-zero here and the bias slot is
    zero (`levels.base.rest_entry`). A group whose other entry is an MLP's output then carries
    exact zeros in its other components until that output (`plan.mlp_output_entry`).

    `written(offset, k, weight)`, where given: `rows(offset, k) @ weight` ([k, batch, pos,
    d_out]) without building the rows, for a group entering at an MLP's activation whose rows
    feed only its output (a neuron's row is one-hot: its activation times the weight's row)."""

    hook: str
    rows: Callable[[int, int], Tensor]
    bias: Tensor | None = None
    first: Callable[[int, int], int] | None = None
    rest: bool = False
    written: Callable[[int, int, Tensor], Tensor] | None = None


@dataclass
class Group:
    """Components decomposed together: their shares sum to the clean activations. Several groups
    (one per layer for heads) ride in one folded forward."""

    labels: list[Label]  # one per component, then the group's bias
    entries: list[Entry]

    @property
    def names(self) -> list[str]:
        """The display strings of `labels` (what `dec.labels` shows)."""
        return [label.name for label in self.labels]


def stored(hook: str, states: Tensor) -> Entry:
    """Components whose states at `hook` are given: `states[c]` for component c."""
    return Entry(hook, lambda offset, k: states[offset:offset + k])
