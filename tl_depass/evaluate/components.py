"""Component-level faithfulness: ablate the heads (or the neurons of one layer) a method ranks
highest, or lowest, and measure what the model still gets right; and how well each method's
scores agree with the exact per-unit causal effects.

Scores are `[layer head_index]` for heads (`Heads()`) and `[d_mlp]` for the neurons of one layer
(`Neurons(layer)`), one ranking per task (the batch mean), as `tl_depass.evaluate.baselines`
returns them. Ablation is zero-ablation of every position (`attn.hook_z` of the head, or
`mlp.hook_post` of the neuron) with `tl_depass.evaluate.patch`, everything else free.
"""

import warnings
from collections.abc import Sequence

import pandas as pd
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from tl_depass.engine.backends import Model
from tl_depass.evaluate import patch
from tl_depass.evaluate.metrics import accuracy, correlation, logit_diff
from tl_depass.evaluate.patch import Patch
from tl_depass.evaluate.unit_levels import UnitLevel, as_level, unit_layers
from tl_depass.levels import Heads

FRACTIONS: tuple[float, ...] = (0.02, 0.05, 0.1, 0.2, 0.3, 0.5)


def n_units(fraction: float, total: int) -> int:
    """k = max(1, int(fraction·total)) (rounded first, so 0.3·10 is 3, not 2)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    return max(1, int(round(fraction * total, 9)))


def selection(scores: Tensor, k: int, which: str) -> Tensor:
    """Bool mask (shape of `scores`) of the k highest ("top") or k lowest ("bottom") scores;
    ties are broken by index; NaN scores come last either way."""
    if which not in ("top", "bottom"):
        raise ValueError(f"which must be 'top' or 'bottom', got {which!r}")
    flat = scores.flatten().nan_to_num(nan=-torch.inf if which == "top" else torch.inf)
    order = torch.argsort(flat, descending=which == "top", stable=True)
    mask = torch.zeros(flat.shape, dtype=torch.bool, device=scores.device)
    mask[order[:k]] = True
    return mask.reshape(scores.shape)


def unit_patches(ablate: Tensor, level: UnitLevel) -> list[Patch]:
    """Zero-ablation patches for the selected heads (`ablate` is [layer head_index] over the
    layers of `level`) or neurons (`ablate` is [d_mlp]) at every position."""
    if isinstance(level, Heads):
        layers = unit_layers(ablate.shape[0], level)
        return [patch.head(layer, int(h)) for row, layer in zip(ablate, layers, strict=True)
                for h in torch.nonzero(row).flatten().tolist()]
    return [patch.neuron(level.layer, i) for i in torch.nonzero(ablate).flatten().tolist()]


def ablation_hooks(ablate: Tensor, level: str | UnitLevel, layer: int | None = None) -> list:
    """Forward hooks zeroing the selected heads or neurons (deprecated: `unit_patches` with
    `patch.run` / `patch.patched`, which also remove their hooks)."""
    warnings.warn("components.ablation_hooks is deprecated: use components.unit_patches with "
                  "tl_depass.evaluate.patch.run", DeprecationWarning, stacklevel=2)
    with warnings.catch_warnings():  # one warning for the call, not a second for the string level
        warnings.simplefilter("ignore", DeprecationWarning)
        level = as_level(level, layer)
    return patch.hooks([unit_patches(ablate, level)])


def task_metrics(logits: Float[Tensor, "batch pos d_vocab"], answers: Int[Tensor, " batch"],
                 wrong: Int[Tensor, " batch"]) -> dict[str, float]:
    """Answer accuracy (top-1 at the last position) and mean logit(answer) − logit(wrong)."""
    return {"accuracy": accuracy(logits, answers),
            "logit_diff": logit_diff(answers, wrong)(logits).item()}


def ablated_metrics(model: Model, tokens: Int[Tensor, "batch pos"], answers: Int[Tensor, " batch"],
                    wrong: Int[Tensor, " batch"], ablate: Bool[Tensor, "..."],
                    level: str | UnitLevel, layer: int | None = None) -> dict[str, float]:
    with torch.no_grad():
        logits = patch.run(model, tokens, unit_patches(ablate, as_level(level, layer)))
    return task_metrics(logits, answers, wrong)


def ablation_table(model: Model, tokens: Int[Tensor, "batch pos"], answers: Int[Tensor, " batch"],
                   wrong: Int[Tensor, " batch"], scores: dict[str, Tensor], level: str | UnitLevel,
                   layer: int | None = None, fractions: Sequence[float] = FRACTIONS) -> pd.DataFrame:
    """One row per (method, k, top/bottom): accuracy and mean logit difference after zero-ablating
    the method's k highest- or lowest-scored units. Fractions that give the same k are merged."""
    level = as_level(level, layer)
    total = next(iter(scores.values())).numel()
    ks = list(dict.fromkeys(n_units(f, total) for f in fractions))
    rows = []
    for method, s in scores.items():
        for k in ks:
            for which in ("top", "bottom"):
                m = ablated_metrics(model, tokens, answers, wrong, selection(s, k, which), level)
                rows.append({"method": method, "k": k, "percent": 100 * k / total, "ablated": which, **m})
    return pd.DataFrame(rows)


def correlations(scores: dict[str, Tensor], reference: Tensor) -> pd.DataFrame:
    """Pearson and Spearman of each method's scores with the reference effects, and Spearman with
    their magnitudes (for methods that score |effect|, like |attribution patching|)."""
    rows = []
    for method, s in scores.items():
        pearson, spearman = correlation(s, reference)
        rows.append({"method": method, "pearson": pearson, "spearman": spearman,
                     "spearman_abs": correlation(s, reference.abs()).spearman})
    return pd.DataFrame(rows)
