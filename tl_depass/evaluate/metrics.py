"""The metrics the evaluation, the comparison with patching and the report share: one logit
difference and one correlation (Pearson, and Spearman as the Pearson correlation of ranks, without
scipy)."""

from collections.abc import Callable
from typing import NamedTuple

import torch
from jaxtyping import Float
from torch import Tensor

from tl_depass.engine.backends import Model
from tl_depass.errors import DepassError

Metric = Callable[[Tensor], Tensor]  # logits [batch pos d_vocab] -> a scalar
Answers = int | Tensor  # one token id for every prompt, or one per prompt ([batch])


def _ids(ids: Answers, like: Tensor) -> Tensor:
    return torch.as_tensor(ids, device=like.device)


def metric_gradient(model: Model, logits: Float[Tensor, "batch pos d_vocab"], metric: Metric
                    ) -> Float[Tensor, "batch pos d_vocab"]:
    """d metric / d logits at `logits` (the model's pre-softcap logits), through the model's final
    softcap if it has one: what turns per-component logits into per-component metric shares."""
    pre = logits.detach().clone().requires_grad_(True)
    cap = model.cfg.output_logits_soft_cap
    with torch.enable_grad():
        value = metric(cap * torch.tanh(pre / cap) if cap and cap > 0 else pre)
        (grad,) = torch.autograd.grad(value, pre)
    return grad


def logit_diff_rows(logits: Float[Tensor, "batch pos d_vocab"], answers: Answers,
                    wrong: Answers | None = None) -> Float[Tensor, " batch"]:
    """logit(answer) − logit(wrong) at the last position, one value per prompt (just the answer's
    logit when `wrong` is None)."""
    last = logits[:, -1]
    rows = torch.arange(last.shape[0], device=last.device)
    score = last[rows, _ids(answers, last)]
    return score if wrong is None else score - last[rows, _ids(wrong, last)]


def logit_diff(answers: Answers, wrong: Answers | None = None) -> Metric:
    """The metric `logits -> mean over prompts of logit(answer) − logit(wrong)` at the last
    position (the answer's logit alone when `wrong` is None)."""
    def metric(logits: Tensor) -> Tensor:
        return logit_diff_rows(logits, answers, wrong).mean()
    return metric


def accuracy(logits: Float[Tensor, "batch pos d_vocab"], answers: Answers) -> float:
    """How often the answer is the top-1 prediction at the last position."""
    last = logits[:, -1]
    return (last.argmax(-1) == _ids(answers, last)).float().mean().item()


class Correlation(NamedTuple):
    pearson: float
    spearman: float


def ranks(x: Float[Tensor, " n"]) -> Float[Tensor, " n"]:
    """Ranks 1..n, ties sharing their mean rank (pandas' `rank()`)."""
    order = torch.argsort(x, stable=True)
    position = torch.empty_like(x)
    position[order] = torch.arange(1, len(x) + 1, dtype=x.dtype, device=x.device)
    _, tie, count = torch.unique(x, return_inverse=True, return_counts=True)
    total = torch.zeros(len(count), dtype=x.dtype, device=x.device).index_add_(0, tie, position)
    return (total / count)[tie]


def pearson(x: Float[Tensor, " n"], y: Float[Tensor, " n"]) -> float:
    x, y = x - x.mean(), y - y.mean()
    scale = (x.square().sum() * y.square().sum()).sqrt()
    return float("nan") if scale == 0 else (x @ y / scale).clamp(-1, 1).item()


def correlation(x: Tensor, y: Tensor) -> Correlation:
    """Pearson and Spearman correlations of the flattened `x` and `y` over the pairs where both
    are numbers (pairs with a NaN are left out before ranking, as scipy's nan_policy="omit");
    NaN below 3 pairs, where either is ±1 by construction, and NaN where a side is constant."""
    x, y = x.detach().flatten().double().cpu(), y.detach().flatten().double().cpu()
    if x.shape != y.shape:
        raise DepassError(f"correlation of {x.numel()} values with {y.numel()} values: pass one "
                         "score per unit on each side")
    keep = ~(x.isnan() | y.isnan())
    x, y = x[keep], y[keep]
    if len(x) < 3:
        return Correlation(float("nan"), float("nan"))
    return Correlation(pearson(x, y), pearson(ranks(x), ranks(y)))


__all__ = ["Answers", "Correlation", "Metric", "accuracy", "correlation", "logit_diff",
           "logit_diff_rows", "pearson", "ranks"]
