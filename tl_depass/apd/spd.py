"""Stochastic Parameter Decomposition (SPD; Bushnaq, Braun, Sharkey 2025, arXiv 2506.20790).

Each decomposed matrix is a sum of `C` rank-one subcomponents `W ≈ Σ_c V[:, c] ⊗ U[c, :]`
(x @ W convention). A causal-importance MLP per subcomponent and site reads `V_c · a` (a the
target's input to the site) and gives `g ∈ [0, 1]`; masks `g + (1 − g)·r`, r ~ U(0, 1), must
reconstruct the target's output.
"""

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn

from tl_depass.apd.configs import SPDConfig
from tl_depass.apd.targets import LinearFn, Site, ToyTarget

__all__ = ["SPD", "lower_leaky_hard_sigmoid", "upper_leaky_hard_sigmoid"]

LEAK = 0.01


def lower_leaky_hard_sigmoid(z: Tensor) -> Tensor:
    """0.01·z below 0, clamp(z, 0, 1) above: used for the masks."""
    return torch.where(z <= 0, LEAK * z, z.clamp(max=1.0))


def upper_leaky_hard_sigmoid(z: Tensor) -> Tensor:
    """relu(z) up to 1, then 1 + 0.01·(z − 1): used in the importance-minimality loss."""
    return torch.where(z <= 1, F.relu(z), 1.0 + LEAK * (z - 1.0))


class SPD(nn.Module):
    """SPD of a frozen toy target. `training_loss` is what `train` optimises."""

    def __init__(self, target: ToyTarget, cfg: SPDConfig):
        super().__init__()
        self.target = target.requires_grad_(False)
        self.cfg = cfg
        generator = torch.Generator().manual_seed(cfg.seed)
        self.V, self.U = nn.ParameterDict(), nn.ParameterDict()
        for name, weight in target.matrices().items():
            d_in, d_out = weight.shape
            v = torch.randn(d_in, cfg.C, generator=generator)
            u = torch.randn(cfg.C, d_out, generator=generator)
            v = v / v.norm(dim=0, keepdim=True)
            u = u / u.norm(dim=1, keepdim=True)
            # scale each rank-one piece by its overlap with the target weight
            overlap = torch.einsum("ic,io,co->c", v, weight.detach().cpu(), u)
            self.V[self._key(name)] = nn.Parameter(v)
            self.U[self._key(name)] = nn.Parameter(u * overlap[:, None])
        h = cfg.ci_hidden
        self.ci = nn.ParameterDict()
        for site in target.sites:
            key = self._key(site.name)
            self.ci[f"{key}__w1"] = nn.Parameter(
                torch.randn(cfg.C, h, generator=generator) * 2**0.5
            )
            self.ci[f"{key}__b1"] = nn.Parameter(torch.zeros(cfg.C, h))
            self.ci[f"{key}__w2"] = nn.Parameter(
                torch.randn(cfg.C, h, generator=generator) * h**-0.5
            )
            self.ci[f"{key}__b2"] = nn.Parameter(torch.zeros(cfg.C))
        self.to(target.device)  # initialised on the CPU: the same numbers on every device

    @staticmethod
    def _key(name: str) -> str:
        return name.replace(".", "__")

    def factors(self, site: Site) -> tuple[Float[Tensor, "d_in C"], Float[Tensor, "C d_out"]]:
        """(V_site, U_site) with `a @ W_site ≈ ((a @ V_site) · mask) @ U_site`."""
        v, u = self.V[self._key(site.matrix)], self.U[self._key(site.matrix)]
        return (v, u) if site.orientation == "as_is" else (u.T, v.T)

    def subcomponent_weights(self, matrix: str) -> Float[Tensor, "C d_in d_out"]:
        v, u = self.V[self._key(matrix)], self.U[self._key(matrix)]
        return torch.einsum("ic,co->cio", v, u)

    def site_delta(self, site: Site) -> Tensor:
        v, u = self.factors(site)
        return self.target.site_weight(site) - v @ u

    def ci_pre(self, inputs: dict[str, Tensor]) -> dict[str, Float[Tensor, "batch C"]]:
        """γ_{l,c}(V_{l,c} · a_l) before the sigmoids, per site."""
        out = {}
        for site in self.target.sites:
            key = self._key(site.name)
            v, _ = self.factors(site)
            s = inputs[site.name] @ v  # [batch, C]
            hidden = F.gelu(s[..., None] * self.ci[f"{key}__w1"] + self.ci[f"{key}__b1"])
            out[site.name] = (hidden * self.ci[f"{key}__w2"]).sum(-1) + self.ci[f"{key}__b2"]
        return out

    def causal_importances(
        self, x: Float[Tensor, "batch n_features"]
    ) -> dict[str, Float[Tensor, "batch C"]]:
        """g = σ_lower(γ) per site on the target's own activations."""
        with torch.no_grad():
            inputs = self.target.run(x).inputs
        return {k: lower_leaky_hard_sigmoid(v) for k, v in self.ci_pre(inputs).items()}

    def linear_fns(
        self, masks: dict[str, Tensor], delta_masks: dict[str, Tensor] | None = None
    ) -> dict[str, LinearFn]:
        """Masked linear maps for the sites in `masks` (other sites keep the target weights)."""

        def make(site: Site) -> LinearFn:
            v, u = self.factors(site)
            mask = masks[site.name]

            def fn(a: Tensor) -> Tensor:
                out = ((a @ v) * mask) @ u
                if delta_masks is not None:
                    out = out + delta_masks[site.name][:, None] * (a @ self.site_delta(site))
                return out

            return fn

        return {site.name: make(site) for site in self.target.sites if site.name in masks}

    def forward(self, x: Tensor, masks: dict[str, Tensor]) -> Tensor:
        return self.target.run(x, self.linear_fns(masks)).output

    # ---- losses ------------------------------------------------------------------------------

    def faithfulness_loss(self) -> Tensor:
        """Σ_l ‖W_l − Σ_c U_c V_c‖² / (elements over sites; tied matrices count twice)."""
        total, count = 0.0, 0
        for site in self.target.sites:
            diff = self.site_delta(site)
            total = total + diff.pow(2).sum()
            count += diff.numel()
        return total / count

    def importance_minimality_loss(self, ci_pre: dict[str, Tensor]) -> Tensor:
        """Σ_l Σ_c |σ_upper(γ)|^p, mean over the batch."""
        total = sum(
            upper_leaky_hard_sigmoid(g).abs().pow(self.cfg.p).sum(-1) for g in ci_pre.values()
        )
        return total.mean()

    def _stochastic_masks(
        self, ci: dict[str, Tensor], generator: torch.Generator
    ) -> tuple[dict[str, Tensor], dict[str, Tensor] | None]:
        masks = {
            k: g + (1 - g) * torch.rand(g.shape, generator=generator, dtype=g.dtype, device=g.device)
            for k, g in ci.items()
        }
        if self.cfg.delta == "none":
            return masks, None
        deltas = {
            k: torch.rand(g.shape[0], generator=generator, dtype=g.dtype, device=g.device)
            for k, g in ci.items()
        }
        return masks, deltas

    def training_loss(
        self, x: Tensor, generator: torch.Generator
    ) -> tuple[Tensor, dict[str, float]]:
        cfg = self.cfg
        with torch.no_grad():
            target_run = self.target.run(x)
        pre = self.ci_pre(target_run.inputs)
        ci = {k: lower_leaky_hard_sigmoid(v) for k, v in pre.items()}
        stochastic, layerwise = 0.0, 0.0
        for _ in range(cfg.n_mask_samples):
            masks, deltas = self._stochastic_masks(ci, generator)
            out = self.target.run(x, self.linear_fns(masks, deltas)).output
            stochastic = stochastic + (out - target_run.output).pow(2).mean()
            for site in self.target.sites:
                masks, deltas = self._stochastic_masks({site.name: ci[site.name]}, generator)
                out = self.target.run(x, self.linear_fns(masks, deltas)).output
                layerwise = layerwise + (out - target_run.output).pow(2).mean() / len(
                    self.target.sites
                )
        stochastic = stochastic / cfg.n_mask_samples
        layerwise = layerwise / cfg.n_mask_samples
        faith = self.faithfulness_loss()
        importance = self.importance_minimality_loss(pre)
        loss = (
            cfg.faithfulness_coeff * faith
            + cfg.stochastic_recon_coeff * stochastic
            + cfg.layerwise_recon_coeff * layerwise
            + cfg.importance_coeff * importance
        )
        metrics = {
            "faithfulness": faith.item(),
            "stochastic_recon": stochastic.item(),
            "layerwise_recon": layerwise.item(),
            "importance_minimality": importance.item(),
            "ci_l0": sum((g > 0.1).float().sum(-1).mean().item() for g in ci.values()) / len(ci),
            "loss": loss.item(),
        }
        return loss, metrics

    def before_optimizer_step(self) -> None:
        pass
