"""Structured component labels: what a component is, read without parsing its display string."""

from dataclasses import dataclass


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
