"""Attribution-based Parameter Decomposition (APD; Braun et al. 2025, arXiv 2501.14926).

Paper notation: `C` components, each spanning every decomposed matrix l as a rank-`m` product
`P_{c,l} = A_{c,l} @ B_{c,l}` (x @ W convention). A forward with a per-sample mask over components
never builds per-sample weights: `(a @ A) → [batch, C, m]`, times the mask, then `@ B`,
summed over C (after batch top-k, only the active (sample, component) pairs are multiplied).
The products are in `contract.py`; the step's costs are in docs/apd_results.md ("APD step speed").
"""

import torch
from jaxtyping import Float
from torch import Tensor, nn

from tl_depass.apd.configs import APDConfig, ConfigError
from tl_depass.apd.contract import component_outputs, masked_product, output_grad_contraction
from tl_depass.apd.targets import LinearFn, ResidualMLP, Site, ToyTarget

__all__ = ["APD", "batch_topk"]


def batch_topk(attributions: Float[Tensor, "batch C"], topk: float) -> Float[Tensor, "batch C"]:
    """Keep the `int(topk · batch)` largest attributions of the whole batch (1.0), others 0.0."""
    k = int(topk * attributions.shape[0])
    if k < 1:
        raise ValueError(f"topk={topk} keeps no component in a batch of {attributions.shape[0]}.")
    flat = attributions.flatten()
    mask = torch.zeros_like(flat)
    mask[flat.topk(k).indices] = 1.0
    return mask.reshape(attributions.shape)


class APD(nn.Module):
    """APD of a frozen toy target. `training_loss` is what `train` optimises."""

    def __init__(self, target: ToyTarget, cfg: APDConfig):
        super().__init__()
        self.target = target.requires_grad_(False)
        self.cfg = cfg
        generator = torch.Generator().manual_seed(cfg.seed)
        self.A, self.B = nn.ParameterDict(), nn.ParameterDict()
        for name, weight in target.matrices().items():
            d_in, d_out = weight.shape
            m = min(d_in, d_out) if cfg.m is None else cfg.m
            a, b = torch.empty(cfg.C, d_in, m), torch.empty(cfg.C, m, d_out)
            if cfg.init == "xavier":  # the reference code's fans: (C + 1 instance) · d_in · m
                a.normal_(0, (2 / ((cfg.C + 1) * d_in * m)) ** 0.5, generator=generator)
                b.normal_(0, (2 / ((cfg.C + 1) * m * d_out)) ** 0.5, generator=generator)
            else:  # uniform over each factor's own fan-in
                a = a.uniform_(-1, 1, generator=generator) * (6 / d_in) ** 0.5 / 2
                b = b.uniform_(-1, 1, generator=generator) * (6 / m) ** 0.5 / 2
            self.A[self._key(name)] = nn.Parameter(a)
            self.B[self._key(name)] = nn.Parameter(b)
        self.to(target.device)  # initialised on the CPU: the same numbers on every device
        probe = self.target.sample(1, generator).to(target.device)
        if cfg.act_recon_coeff > 0 and not self.target.run(probe).hidden:
            raise ConfigError(
                f"APDConfig.act_recon_coeff={cfg.act_recon_coeff} but {type(target).__name__} "
                "has no "
                "hidden MLP activations to reconstruct; set act_recon_coeff=0."
            )
        if cfg.a_norm == "unit":
            self.normalise_A()

    @staticmethod
    def _key(matrix: str) -> str:
        return matrix.replace(".", "__")

    def factors(self, site: Site) -> tuple[Float[Tensor, "C d_in m"], Float[Tensor, "C m d_out"]]:
        """(first, second) factors for a site: `a @ W_site ≈ Σ_c (a @ first_c) @ second_c`."""
        a, b = self.A[self._key(site.matrix)], self.B[self._key(site.matrix)]
        if site.orientation == "as_is":
            return a, b
        return b.transpose(-1, -2), a.transpose(-1, -2)

    def component_weights(self, matrix: str) -> Float[Tensor, "C d_in d_out"]:
        """`P_{c,l}` for every component of one matrix."""
        return self.A[self._key(matrix)] @ self.B[self._key(matrix)]

    def linear_fns(self, mask: Float[Tensor, "batch C"]) -> dict[str, LinearFn]:
        def make(site: Site) -> LinearFn:
            first, second = self.factors(site)
            return lambda a: masked_product(a, first, second, mask)

        return {site.name: make(site) for site in self.target.sites}

    def forward(
        self, x: Float[Tensor, "batch n_features"], mask: Float[Tensor, "batch C"]
    ) -> Float[Tensor, "batch n_out"]:
        return self.target.run(x, self.linear_fns(mask)).output

    # ---- attributions ----------------------------------------------------------------------

    def _target_output_grads(
        self, x: Float[Tensor, "batch n_features"]
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Site inputs [batch, d_in] and ∂f_o/∂(site output) for every output o:
        [batch, n_out, d_out], one vector-Jacobian product per output of one sample, vmapped.

        The output basis is built outside the vmap over samples, so a Jacobian that does not
        depend on the sample (a site followed only by linear maps) is computed once and comes
        back expanded over the batch with stride 0, which `output_grad_contraction` uses.
        """
        target, sites = self.target, self.target.sites
        n_out = target.run(x[:1]).output.shape[-1]
        basis = torch.eye(n_out, dtype=x.dtype, device=x.device)

        def one_sample(x_b: Tensor, probes: dict[str, Tensor]):
            def run(probes: dict[str, Tensor]):
                def make(site: Site) -> LinearFn:
                    return lambda a: a @ target.site_weight(site) + probes[site.name]

                record = target.run(x_b[None], {s.name: make(s) for s in sites})
                return record.output[0], {k: v[0] for k, v in record.inputs.items()}

            _, vjp_fn, inputs = torch.func.vjp(run, probes, has_aux=True)
            return torch.func.vmap(vjp_fn)(basis)[0], inputs

        probes = {s.name: x.new_zeros(x.shape[0], target.site_weight(s).shape[1]) for s in sites}
        with torch.enable_grad():
            grads, inputs = torch.func.vmap(one_sample)(x, probes)
        return inputs, grads

    @torch.no_grad()
    def jacobian_contraction(self, x: Float[Tensor, "batch n_features"]) -> Float[Tensor, "batch C n_out"]:
        """`Σ_l Σ_j ∂f_o/∂y_{l,j} (a_l P_{c,l})_j` through the per-sample output Jacobians: any
        target's path (the residual MLP's `component_jvps` gives the same without Jacobians)."""
        inputs, grads = self._target_output_grads(x)
        total = None
        for site in self.target.sites:
            a, g = inputs[site.name], grads[site.name]
            total = output_grad_contraction(a, *self.factors(site), g, out=total)
        return total

    @torch.no_grad()
    def attributions(self, x: Float[Tensor, "batch n_features"]) -> Float[Tensor, "batch C"]:
        """Per-sample, per-component attribution of the chosen kind (never differentiated)."""
        kind = self.cfg.attribution
        if kind == "gradient":
            # sqrt(mean_o (Σ_l Σ_j ∂f_o/∂y_{l,j} (a_l P_{c,l})_j)²), all on the target
            if isinstance(self.target, ResidualMLP):  # without building Jacobians
                factors = {site.name: self.factors(site) for site in self.target.sites}
                total = self.target.component_jvps(x, factors)
            else:
                total = self.jacobian_contraction(x)
            return torch.linalg.vector_norm(total, dim=-1) / total.shape[-1] ** 0.5
        if kind == "activation":
            inputs = self.target.run(x).inputs
            return sum(
                component_outputs(inputs[site.name], *self.factors(site)).pow(2).sum(-1)
                for site in self.target.sites
            )
        # ablation: output change when one component is removed from the all-ones APD model
        ones = x.new_ones(x.shape[0], self.cfg.C)
        full = self.forward(x, ones)
        scores = []
        for c in range(self.cfg.C):
            ablated = ones.clone()
            ablated[:, c] = 0.0
            scores.append((full - self.forward(x, ablated)).pow(2).mean(-1).sqrt())
        return torch.stack(scores, dim=-1)

    # ---- losses ------------------------------------------------------------------------------

    def faithfulness_loss(self) -> Tensor:
        """Σ_l ‖W_l − Σ_c P_{c,l}‖² / (elements over sites; tied matrices count twice)."""
        total, count = 0.0, 0
        for site in self.target.sites:
            first, second = self.factors(site)
            C, d_in, m = first.shape
            summed = first.permute(1, 0, 2).reshape(d_in, C * m) @ second.reshape(C * m, -1)
            diff = self.target.site_weight(site) - summed
            total = total + diff.pow(2).sum()
            count += diff.numel()
        return total / count

    def simplicity_loss(self, mask: Float[Tensor, "batch C"]) -> Tensor:
        """Schatten-p of the active components:
        Σ mask·Σ_m (‖A_m‖²‖B_m‖² + ε)^{p/2} / (n_params·B)."""
        total, count = 0.0, 0
        for site in self.target.sites:
            first, second = self.factors(site)
            per_rank = first.pow(2).sum(1) * second.pow(2).sum(2)  # [C, m]
            schatten = (per_rank + 1e-16).pow(self.cfg.p / 2).sum(-1)  # [C]
            total = total + (mask * schatten).sum()
            count += first.shape[1] * second.shape[2]
        return total / (count * mask.shape[0])

    def training_loss(
        self, x: Tensor, generator: torch.Generator
    ) -> tuple[Tensor, dict[str, float]]:
        cfg = self.cfg
        if cfg.a_norm == "unit":
            self.normalise_A()
        with torch.no_grad():
            target_run = self.target.run(x)
        mask = batch_topk(self.attributions(x), cfg.topk)
        topk_run = self.target.run(x, self.linear_fns(mask))
        faith = self.faithfulness_loss()
        minimality = (topk_run.output - target_run.output).pow(2).mean()
        simplicity = self.simplicity_loss(mask)
        loss = cfg.faithfulness_coeff * faith + cfg.minimality_coeff * minimality
        loss = loss + cfg.simplicity_coeff * simplicity
        metrics = {
            "faithfulness": faith.item(),
            "minimality": minimality.item(),
            "simplicity": simplicity.item(),
        }
        if cfg.act_recon_coeff > 0:
            act = sum(
                (topk_run.hidden[k] - target_run.hidden[k]).pow(2).mean() for k in target_run.hidden
            ) / len(target_run.hidden)
            loss = loss + cfg.act_recon_coeff * act
            metrics["act_recon"] = act.item()
        metrics["loss"] = loss.item()
        return loss, metrics

    # ---- optional unit-norm A (residual MLP 1-layer) -------------------------------------------

    @torch.no_grad()
    def normalise_A(self) -> None:
        """Rescale every A_{c,l,:,m} to unit norm over d_in."""
        for a in self.A.values():
            a.div_(a.norm(dim=1, keepdim=True).clamp_min(1e-12))

    @torch.no_grad()
    def before_optimizer_step(self) -> None:
        """With unit-norm A, drop the gradient component parallel to A (stay on the sphere)."""
        if self.cfg.a_norm != "unit":
            return
        for a in self.A.values():
            if a.grad is not None:
                a.grad.sub_((a.grad * a).sum(dim=1, keepdim=True) * a)
