"""Structured component labels: what a component is, read without parsing its display string."""

from dataclasses import dataclass


@dataclass(frozen=True)
class Label:
    """One component of a decomposition.

    `name` is the display string (`dec.labels`, e.g. "L3H7"); `kind` what it is ("token", "pos",
    "head", "attn", "mlp", "neuron", "subspace", "feature", "part", "param", "rest", "bias", ...);
    `layer` the block it is written in (None for splits of one activation); `index` its position,
    head, neuron, feature or subcomponent (None where the kind has one per layer); `group` the
    group of components it belongs to (their shares sum to the clean activations)."""

    name: str
    kind: str
    layer: int | None = None
    index: int | None = None
    group: int = 0

    def __str__(self) -> str:
        return self.name
