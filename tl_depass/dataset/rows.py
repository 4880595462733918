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

from tl_depass.levels import Heads, Modules, Neurons, TokensAt
from tl_depass.levels.label import Label

COLUMNS = ["prompt", "component", "score", "kind", "layer", "unit", "position", "group",
           "has_wrong", "clean_metric"]
LEVELS = (TokensAt, Heads, Modules, Neurons)


def structured(result) -> list[Label]:
    """The structured label of each component of `result` (a Decomposition or an Attribution):
    its `component_labels`, token components named by position only ("tok 3": their strings are
    in the prompt, and a batch of one would name them by string). The one place the table reads
    label fields."""
    return [Label(f"tok {x.index}", x.kind, x.layer, x.index, x.group) if x.kind == "token" else x
            for x in result.component_labels]


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
