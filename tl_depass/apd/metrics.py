"""Evaluation: MMCS / ML2R, alive subcomponents, CI-L0, one-hot causal importances, top-1 MSE,
neuron contributions. Everything here is read-only on the decomposition."""

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from tl_depass.apd.apd import APD, batch_topk
from tl_depass.apd.spd import SPD
from tl_depass.apd.targets import ResidualMLP, ToyTarget

#: A (sub)component is alive when its weight's Frobenius norm exceeds this (the papers' 0.1).
ALIVE_THRESHOLD = 0.1
#: The value of the one feature on in the residual MLPs' one-hot inputs (the paper's figures).
RESIDUAL_ONE_HOT = 0.75

__all__ = [
    "ALIVE_THRESHOLD",
    "RESIDUAL_ONE_HOT",
    "FeatureMatch",
    "alive",
    "component_weights",
    "mmcs_ml2r",
    "subcomponent_norms",
    "alive_count",
    "ci_l0",
    "one_hot_inputs",
    "one_hot_causal_importance",
    "permute_to_diagonal",
    "apd_top1_mse",
    "feature_losses",
    "top1_components",
    "loss_scores",
    "neuron_contributions",
    "layer_contributions",
    "layer_shares",
]


@dataclass(frozen=True)
class FeatureMatch:
    """Per-feature best cosine similarity and norm ratio; mean ± std over features."""

    cosine: Float[Tensor, " n_features"]
    l2_ratio: Float[Tensor, " n_features"]
    best: Tensor

    @property
    def mmcs(self) -> tuple[float, float]:
        return self.cosine.mean().item(), self.cosine.std(unbiased=False).item()

    @property
    def ml2r(self) -> tuple[float, float]:
        return self.l2_ratio.mean().item(), self.l2_ratio.std(unbiased=False).item()


@torch.no_grad()
def component_weights(method: APD | SPD, matrix: str) -> Float[Tensor, "C d_in d_out"]:
    """Each (sub)component's weight for one matrix."""
    if isinstance(method, APD):
        return method.component_weights(matrix)
    return method.subcomponent_weights(matrix)


@torch.no_grad()
def mmcs_ml2r(
    weight: Float[Tensor, "n_features d_hidden"], components: Float[Tensor, "C n_features d_hidden"]
) -> FeatureMatch:
    """For each feature j (row j of W, column j in the paper's `W: [d_hidden, n_features]`),
    the component whose row j points most in W's direction, and its norm relative to W's."""
    eps = 1e-12
    cos = torch.einsum("cjh,jh->cj", components, weight) / (
        components.norm(dim=-1) * weight.norm(dim=-1)[None] + eps
    )
    best_cos, best = cos.max(dim=0)
    best_rows = components[best, torch.arange(weight.shape[0])]
    ratio = best_rows.norm(dim=-1) / (weight.norm(dim=-1) + eps)
    return FeatureMatch(cosine=best_cos, l2_ratio=ratio, best=best)


@torch.no_grad()
def subcomponent_norms(method: APD | SPD, matrix: str) -> Float[Tensor, " C"]:
    """Frobenius norm of each (sub)component's weight for one matrix."""
    return component_weights(method, matrix).flatten(1).norm(dim=-1)


def alive(weights: Float[Tensor, "C d_in d_out"], threshold: float = ALIVE_THRESHOLD) -> int:
    """How many of these (sub)component weights have a Frobenius norm above `threshold`."""
    return int((weights.flatten(1).norm(dim=-1) > threshold).sum())


@torch.no_grad()
def alive_count(method: APD | SPD, matrix: str, threshold: float = ALIVE_THRESHOLD) -> int:
    """Subcomponents whose weight norm exceeds `threshold`."""
    return alive(component_weights(method, matrix), threshold)


@torch.no_grad()
def ci_l0(spd: SPD, x: Tensor, threshold: float = 0.1) -> dict[str, float]:
    """Mean number of subcomponents per sample with causal importance above `threshold`."""
    return {
        k: (g > threshold).float().sum(-1).mean().item()
        for k, g in spd.causal_importances(x).items()
    }


def one_hot_inputs(target: ToyTarget, value: float) -> Float[Tensor, "n_features n_features"]:
    return torch.eye(target.n_features) * value


@torch.no_grad()
def one_hot_causal_importance(spd: SPD, value: float) -> dict[str, Float[Tensor, "n_features C"]]:
    """Causal importances when exactly one feature is on, at `value`."""
    return spd.causal_importances(one_hot_inputs(spd.target, value))


def permute_to_diagonal(matrix: Float[Tensor, "n_features C"]) -> list[int]:
    """Column order putting each feature's strongest unused column on the diagonal, then
    the rest."""
    order: list[int] = []
    for row in matrix:
        ranked = row.argsort(descending=True).tolist()
        pick = next(c for c in ranked if c not in order) if len(order) < matrix.shape[1] else None
        if pick is not None:
            order.append(pick)
    return order + [c for c in range(matrix.shape[1]) if c not in order]


@torch.no_grad()
def apd_top1_mse(apd: APD, value: float) -> Float[Tensor, " n_features"]:
    """Per feature: MSE to the target of the APD forward keeping only the one component with the
    highest attribution on that feature's one-hot input."""
    x = one_hot_inputs(apd.target, value)
    attributions = apd.attributions(x)
    mask = torch.zeros_like(attributions)
    mask[torch.arange(x.shape[0]), attributions.argmax(-1)] = 1.0
    return (apd(x, mask) - apd.target(x)).pow(2).mean(-1)


def feature_losses(
    apd: APD, samples: int = 100, chunk: int = 512, seed: int = 0
) -> dict[str, Float[Tensor, " n_features"]]:
    """Per feature, the mean squared error to the labels on the inputs where it alone is active,
    measured as the reference code does: batches of the training size drawn from the training
    distribution (`target.sample`), the batch top-k mask of the training loss over each whole
    batch ("apd_topk"), each input's single most attributed component ("apd_top1"), and the target
    ("target"); batches are drawn until every feature has been alone `samples` times. The
    residual-MLP test: top-k within 10% of the target's loss. Attributions are computed `chunk`
    inputs at a time (memory)."""
    target, n, size = apd.target, apd.target.n_features, apd.cfg.optim.batch_size
    p = target.cfg.feature_prob
    alone_p = p * (1 - p) ** (n - 1)  # a given feature is the only one present
    if samples < 1:
        raise ValueError(f"feature_losses: samples={samples}: need at least 1 input per feature.")
    if samples > 10_000 * size * alone_p:  # batches expected: samples / (size * alone_p)
        raise ValueError(f"feature_losses: a feature is alone in an input with probability "
                         f"{alone_p:.1e}, so {samples} such inputs per feature take more than "
                         f"10 000 batches of {size}: lower `samples`.")
    g = torch.Generator().manual_seed(seed)
    names = ("target", "apd_topk", "apd_top1")
    sums, counts = torch.zeros(len(names), n), torch.zeros(n)
    while counts.min() < samples:
        x = target.sample(size, g).to(target.device)
        attributions = torch.cat([apd.attributions(part).detach() for part in x.split(chunk)])
        topk = batch_topk(attributions, apd.cfg.topk)  # over the whole batch, as in training
        alone = (x != 0).sum(-1) == 1  # only these inputs are scored (and run)
        x, attributions, topk = x[alone], attributions[alone], topk[alone]
        top1 = torch.zeros_like(attributions)
        top1[torch.arange(len(x)), attributions.argmax(-1)] = 1.0
        feature = (x != 0).int().argmax(-1).cpu()
        with torch.no_grad():
            outputs = (target(x), apd(x, topk), apd(x, top1))
        labels = target.labels(x)
        for row, out in enumerate(outputs):
            sums[row] += torch.bincount(feature, (out - labels).pow(2).mean(-1).cpu(), n)
        counts += torch.bincount(feature, minlength=n)
    return {name: sums[row] / counts for row, name in enumerate(names)}


@torch.no_grad()
def top1_components(apd: APD, value: float) -> Tensor:
    """Per feature, the component with the highest attribution on its one-hot input at `value`."""
    return apd.attributions(one_hot_inputs(apd.target, value)).argmax(-1)


def loss_scores(apd: APD) -> dict:
    """The residual-MLP test's loss half from `feature_losses`: the mean top-k loss over the
    target's, the features whose top-k loss is within 10% of the target's, every feature's losses."""
    losses = feature_losses(apd)
    return {
        "feature_losses": {k: v.tolist() for k, v in losses.items()},
        "topk_loss_over_target": (losses["apd_topk"].mean() / losses["target"].mean()).item(),
        "features_topk_within_10pct": int((losses["apd_topk"] <= 1.1 * losses["target"]).sum()),
    }


@torch.no_grad()
def neuron_contributions(
    target: ResidualMLP, w_in: Float[Tensor, "d_embed d_mlp"], w_out: Float[Tensor, "d_mlp d_embed"]
) -> Float[Tensor, "n_features d_mlp"]:
    """How much each neuron carries feature i straight back to output i:
    `(W_E[i] @ W_in)[n] · (W_out @ W_U[:, i])[n]` (paper's `(W_U W_out) ⊙ (W_in W_E)`)."""
    read = target.W_E @ w_in  # [n_features, d_mlp]
    write = (w_out @ target.W_U).T  # [n_features, d_mlp]
    return read * write


def layer_contributions(
    target: ResidualMLP, matrices: Mapping[str, Tensor]
) -> Float[Tensor, "n_features n_layers d_mlp"]:
    """`neuron_contributions` of every layer, of the matrices named as the target's
    (`layers.L.W_in`, `layers.L.W_out`): each neuron's direct path from feature i's embedding to
    output i, layer by layer."""
    return torch.stack(
        [
            neuron_contributions(target, matrices[f"layers.{i}.W_in"], matrices[f"layers.{i}.W_out"])
            for i in range(target.cfg.n_layers)
        ],
        dim=1,
    )


def layer_shares(
    contributions: Float[Tensor, "n_features n_layers d_mlp"],
) -> Float[Tensor, "n_features n_layers"]:
    """Each layer's share of a feature's summed |neuron contributions| (rows sum to 1; a row
    with no contribution at all is 0)."""
    size = contributions.abs().sum(-1)
    return size / size.sum(-1, keepdim=True).clamp_min(torch.finfo(size.dtype).tiny)
