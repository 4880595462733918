"""Readouts of a dataset table (`run_dataset`, `scores.parquet`): mean / median share per
component, the top-k components, and the Disrupt-top / Recover-top token-deletion curves over the
dataset, computed by `tl_depass.evaluate.tokens` (the one implementation)."""

from collections.abc import Sequence

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from tl_depass.engine.backends import Model
from tl_depass.errors import DepassError
from tl_depass.evaluate import tokens as token_eval

KEYS = ["group", "component", "kind", "layer", "unit", "position"]


def summary(table: pd.DataFrame) -> pd.DataFrame:
    """Per component (in the table's order): mean, median and standard deviation of its share
    over prompts, the number of prompts, and the mean share of the clean metric. Token rows
    aggregate by position ("tok 3" is the fourth token of every prompt that has one)."""
    check_table(table)
    share = table["score"] / table["clean_metric"]
    grouped = table.assign(fraction=share).groupby(KEYS, dropna=False, sort=False)
    out = grouped.agg(mean=("score", "mean"), median=("score", "median"), std=("score", "std"),
                      prompts=("prompt", "nunique"), mean_fraction=("fraction", "mean"))
    return out.reset_index()


def top_components(table: pd.DataFrame, k: int = 10, by: str = "mean",
                   absolute: bool = False) -> pd.DataFrame:
    """The `k` components with the largest `by` ("mean" or "median") share over prompts (by its
    size with `absolute=True`); the rest and bias rows are never among them."""
    if by not in ("mean", "median"):
        raise DepassError(f"by must be 'mean' or 'median', got {by!r}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise DepassError(f"k must be a positive int, got {k!r}")
    stats = summary(table)
    named = stats[~stats["kind"].isin(["rest", "bias"])]
    key = named[by].abs() if absolute else named[by]
    return named.loc[key.sort_values(ascending=False, kind="stable").index[:k]].reset_index(drop=True)


def deletion_curves(model: Model, table: pd.DataFrame, prompts: Sequence, answers: Sequence | Tensor,
                    percents: Sequence[int] = token_eval.PERCENTS
                    ) -> dict[str, Float[Tensor, "percent prompt"]]:
    """Disrupt-top and Recover-top over the dataset: each prompt's token scores from a
    token-level `table` rank its tokens, which `tl_depass.evaluate.tokens.deletion_curves`
    deletes (the top-k, or all but them) and scores by the answer's probability. Returns each
    prompt's curve (prompts in table order); `tl_depass.evaluate.tokens.summarise` gives the
    AOPC areas, `.mean(1)` the curve."""
    from tl_depass.dataset.runner import prepare

    check_table(table)
    tokens_rows = table[table["kind"] == "token"]
    if tokens_rows.empty:
        raise DepassError("deletion curves need a token-level table (components='tokens' / "
                          "--level tokens): this one has no token rows")
    ids = sorted(tokens_rows["prompt"].unique().tolist())
    items = prepare(model, prompts, answers, None)
    if max(ids) >= len(items):
        raise DepassError(f"the table has prompt {max(ids)} but {len(items)} prompts were given: "
                          "pass the prompts the table was computed from")
    scores = {p: torch.tensor(rows.sort_values("position")["score"].to_numpy())
              for p, rows in tokens_rows.groupby("prompt")}
    device = next(model.parameters()).device
    curves: dict[str, dict[int, Tensor]] = {"disrupt": {}, "recover": {}}
    by_length: dict[int, list[int]] = {}
    for p in ids:
        n = len(items[p].tokens)
        if n < 3 or len(scores[p]) != n:
            raise DepassError(f"prompt {p}: {n} tokens and {len(scores[p])} token rows; deletion "
                              "curves need at least 3 tokens and the table of these prompts")
        by_length.setdefault(n, []).append(p)
    for group in by_length.values():  # prompts of one length in one batch
        tokens = torch.tensor([items[p].tokens for p in group], device=device)
        answer = torch.tensor([items[p].target for p in group], device=device)
        got = token_eval.deletion_curves(model, tokens, answer, torch.stack([scores[p] for p in group]),
                                         percents)
        for mode, values in got.items():
            curves[mode] |= {p: values[:, j] for j, p in enumerate(group)}
    return {mode: torch.stack([c[p] for p in ids], 1) for mode, c in curves.items()}


def check_table(table: pd.DataFrame) -> None:
    missing = [c for c in ("prompt", "score", "clean_metric", *KEYS) if c not in table.columns]
    if missing:
        raise DepassError(f"not a dataset table (columns {missing} missing): pass what "
                          "run_dataset returns or pandas.read_parquet(DIR / 'scores.parquet')")
