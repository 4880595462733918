"""The scores table: one row per (prompt, component), its label fields structured, never parsed.

Columns: `prompt` (0-based), `component` (display label), `score` (the component's share of the
target logit, minus the wrong one's, at the prompt's last token), `kind` ("token", "head", "attn",
"mlp", "neuron", "rest", "bias", or "rest+bias" on the backward path), `layer`, `unit` (head,
neuron), `position` (token components), `group` (components whose shares sum to the metric),
`has_wrong`, `clean_metric`.
"""

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from tl_depass.engine.backends import Model
from tl_depass.engine.validate import check_layers
from tl_depass.errors import DepassError
from tl_depass.levels import Heads, Modules, Neurons
from tl_depass.levels.components import TokensAt
from tl_depass.levels.label import Label

COLUMNS = ["prompt", "component", "score", "kind", "layer", "unit", "position", "group",
           "has_wrong", "clean_metric"]
LEVELS = (TokensAt, Heads, Modules, Neurons)


def structured(result, spec, model: Model, n_pos: int, named_only: bool) -> list[Label]:
    """The structured label of each component of `result` (a Decomposition, or an Attribution
    when `named_only`): its `component_labels` where the result has them, else the same records
    built from the level, in the order the level lays its components out. The one place the
    table reads label fields."""
    labels = getattr(result, "component_labels", None)
    if labels is None:
        labels = level_labels(spec, model, n_pos)
        if named_only:
            labels = [x for x in labels if x.kind not in ("rest", "bias")]
    if len(labels) != len(result.labels):
        raise DepassError(f"{len(result.labels)} components but {len(labels)} structured labels for "
                          f"{spec!r}: tl_depass.levels and the dataset runner disagree (a bug)")
    return [Label(f"tok {x.index}", x.kind, x.layer, x.index, x.group) if x.kind == "token" else x
            for x in labels]  # token names carry their string only in batches of one


def level_labels(spec, model: Model, n_pos: int) -> list[Label]:
    """What `tl_depass.levels` lays out for `spec`, as structured labels."""
    if isinstance(spec, TokensAt):
        return [Label(f"tok {p}", "token", spec.layer, p) for p in range(n_pos)] + [
            Label("bias", "bias")]
    if isinstance(spec, Neurons):
        layer = spec.layer
        chosen = range(model.cfg.d_mlp) if spec.neurons is None else spec.neurons
        return [Label(f"L{layer} rest", "rest", layer),
                *[Label(f"L{layer}N{i}", "neuron", layer, i) for i in chosen],
                Label(f"L{layer} bias", "bias", layer)]
    out = []
    for g, layer in enumerate(check_layers(model, spec.layers, type(spec).__name__)):
        if isinstance(spec, Heads):
            units = [Label(f"L{layer}H{h}", "head", layer, h, g) for h in range(model.cfg.n_heads)]
        else:
            units = [Label(f"L{layer} {k}", k, layer, None, g)
                     for k in ("attn",) + (() if model.cfg.attn_only else ("mlp",))]
        out += [Label(f"L{layer} rest", "rest", layer, None, g), *units,
                Label(f"L{layer} bias", "bias", layer, None, g)]
    return out


def remainders(labels: list[Label], scores: Tensor, metric: Tensor) -> tuple[list[Label], Tensor]:
    """On the backward path, each group's metric less its named components' shares: the bias
    at the token level (no rest there), the rest and bias together for heads, modules, neurons."""
    groups = list(dict.fromkeys(x.group for x in labels))
    extra, values = [], []
    for g in groups:
        members = [c for c, x in enumerate(labels) if x.group == g]
        first = labels[members[0]]
        if first.kind == "token":
            extra.append(Label("bias", "bias", None, None, g))
        else:
            extra.append(Label(f"L{first.layer} rest+bias", "rest+bias", first.layer, None, g))
        values.append(metric - scores[members].sum(0))
    return extra, torch.stack(values)


def frame(prompts: list[int], lengths: list[int], labels: list[Label], scores: Tensor,
          metric: Tensor, has_wrong: bool) -> pd.DataFrame:
    """The table rows of one batch: `scores` [component, batch], `metric` [batch]; token
    components past a prompt's own length (padding) are left out."""
    n, batch = scores.shape
    score = scores.detach().double().cpu().numpy()
    position = np.array([x.index if x.kind == "token" else -1 for x in labels])
    keep = (position[:, None] < np.array(lengths)[None, :])  # [component, batch]
    b, c = np.nonzero(keep.T)  # rows ordered by prompt, then component

    def ints(values):
        return pd.array([values[i] for i in c], dtype="Int64")

    return pd.DataFrame({
        "prompt": np.array(prompts, dtype=np.int64)[b],
        "component": [labels[i].name for i in c],
        "score": score[c, b],
        "kind": [labels[i].kind for i in c],
        "layer": ints([x.layer for x in labels]),
        "unit": ints([None if x.kind == "token" else x.index for x in labels]),
        "position": ints([x.index if x.kind == "token" else None for x in labels]),
        "group": np.array([x.group for x in labels], dtype=np.int64)[c],
        "has_wrong": np.full(len(c), has_wrong),
        "clean_metric": metric.detach().double().cpu().numpy()[b],
    }, columns=COLUMNS)
