"""Matplotlib figures for decompositions. Each function returns a Figure; callers save it."""

import torch
from torch import Tensor

from tl_depass.apd.metrics import permute_to_diagonal
from tl_depass.optional import need

plt = need("matplotlib.pyplot", "APD/SPD figures")
Figure = need("matplotlib.figure", "APD/SPD figures").Figure

__all__ = [
    "plot_ci_heatmaps",
    "plot_tms_vectors",
    "plot_norms",
    "plot_neuron_contributions",
    "plot_history",
    "save",
]


def plot_ci_heatmaps(ci: dict[str, Tensor], title: str) -> Figure:
    """One-hot causal importances per site, columns permuted so each feature's subcomponent is
    on the diagonal; an identity pattern means one subcomponent per feature."""
    fig, axes = plt.subplots(1, len(ci), figsize=(4.5 * len(ci), 4), squeeze=False)
    for ax, (site, g) in zip(axes[0], ci.items(), strict=True):
        order = permute_to_diagonal(g)
        shown = g[:, order][:, : max(g.shape[0], 1) + 5].clamp(0, 1).numpy()
        im = ax.imshow(shown, vmin=0, vmax=1, cmap="Blues", aspect="auto")
        ax.set_title(site)
        ax.set_xlabel("subcomponent (permuted)")
        ax.set_ylabel("one-hot input feature")
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="causal importance")
    fig.suptitle(title)
    return fig


def plot_tms_vectors(
    weight: Tensor, components: Tensor, title: str, threshold: float = 0.1
) -> Figure:
    """TMS with 2 hidden dims: the target's feature directions (rows of W) and each component's,
    one panel per component whose norm exceeds `threshold`."""
    norms = components.flatten(1).norm(dim=-1)
    alive = [c for c in norms.argsort(descending=True).tolist() if norms[c] > threshold]
    panels = [("target W", weight)] + [(f"component {c}", components[c]) for c in alive]
    fig, axes = plt.subplots(1, len(panels), figsize=(2.6 * len(panels), 2.8), squeeze=False)
    lim = 1.1 * weight.norm(dim=-1).max().item()
    for ax, (name, w) in zip(axes[0], panels, strict=True):
        for j, row in enumerate(w[:, :2]):
            ax.plot([0, row[0]], [0, row[1]], color=f"C{j % 10}", lw=2)
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_aspect("equal")
        ax.set_title(name, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_norms(norms: dict[str, Tensor], title: str) -> Figure:
    """Sorted (sub)component weight norms per matrix: the alive ones stand out."""
    fig, ax = plt.subplots(figsize=(6, 3))
    for name, n in norms.items():
        ax.plot(torch.sort(n, descending=True).values.numpy(), marker="o", ms=3, label=name)
    ax.set_yscale("log")
    ax.set_xlabel("rank by norm")
    ax.set_ylabel("‖weight‖_F")
    ax.legend()
    ax.set_title(title)
    fig.tight_layout()
    return fig


def plot_neuron_contributions(target: Tensor, best: Tensor, title: str, n_show: int = 10) -> Figure:
    """Per feature, each neuron's contribution in the target and in the feature's best component."""
    fig, axes = plt.subplots(2, 1, figsize=(8, 4), sharex=True)
    for ax, data, name in zip(axes, (target, best), ("target", "best component"), strict=True):
        vmax = data[:n_show].abs().max().item()
        ax.imshow(data[:n_show].numpy(), cmap="RdBu", vmin=-vmax, vmax=vmax, aspect="auto")
        ax.set_ylabel(f"{name}\nfeature")
    axes[1].set_xlabel("neuron")
    fig.suptitle(title)
    return fig


def plot_history(history: list[dict], keys: list[str], title: str) -> Figure:
    """Logged training metrics against step, log scale."""
    fig, ax = plt.subplots(figsize=(6, 3))
    steps = [row["step"] for row in history]
    for key in keys:
        ax.plot(steps, [row[key] for row in history], label=key)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.legend(fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    return fig


def save(fig: Figure, path) -> None:
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
