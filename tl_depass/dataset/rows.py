"""The scores table: one row per (prompt, component), its label fields structured, never parsed.

Columns: `prompt` (0-based), `component` (display label), `score` (the component's share of the
target logit, minus the wrong one's, at the prompt's last token), `kind` ("token", "head", "attn",
"mlp", "neuron", "rest", "bias": the same rows on the forward and the backward path), `layer`,
`unit` (head, neuron), `position` (token components), `group` (components whose shares sum to the
metric), `has_wrong`, `clean_metric`.
"""

import numpy as np
import pandas as pd
from torch import Tensor

from tl_depass.levels import Heads, Modules, Neurons, TokensAt
from tl_depass.levels.label import Label

COLUMNS = ["prompt", "component", "score", "kind", "layer", "unit", "position", "group",
           "has_wrong", "clean_metric"]
LEVELS = (TokensAt, Heads, Modules, Neurons)


def structured(labels: list[Label]) -> list[Label]:
    """The structured labels of a result's rows (`Attribution.with_rest_and_bias()`), token
    components named by position only ("tok 3": their strings are in the prompt, and a batch of
    one would name them by string). The one place the table reads label fields."""
    return [Label(f"tok {x.index}", x.kind, x.layer, x.index, x.group) if x.kind == "token" else x
            for x in labels]


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
