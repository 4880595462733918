"""Stochastic Parameter Decomposition of TransformerLens models: the result object.

`ParamDecomposition` holds, per site (one weight matrix as the model uses it, see
`tl_depass.apd.lm.sites`), `C` rank-one subcomponents `W ≈ Σ_c V[:, c] U[c]`, the delta
`W − V U` (one more part, so that every mask of ones gives the target exactly) and the
causal-importance MLPs. `C` counts subcomponents as in the SPD paper; it is not DePass'
`component` axis. On disk: `tl_depass.apd.lm.saved`.
"""

from pathlib import Path

import einops
import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn

from tl_depass.apd.lm import saved
from tl_depass.apd.lm.sites import (
    MATRICES,
    SiteSpec,
    find_sites,
    flatten_heads,
    site_key,
    site_spec,
    unflatten_heads,  # noqa: F401  (imported from here by apd.lm.train and older code)
)
from tl_depass.apd.spd import lower_leaky_hard_sigmoid
from tl_depass.engine.backends import Model
from tl_depass.errors import DepassError

__all__ = ["MATRICES", "SiteSpec", "find_sites", "ParamSite", "ParamDecomposition"]


class ParamSite(nn.Module):
    """The decomposition of one site: `W = V U + delta`, a causal-importance MLP per subcomponent
    (1 → `ci_hidden` GELU → 1 on `V_c · x`), and the site's frozen weight and bias."""

    def __init__(self, spec: SiteSpec, C: int, ci_hidden: int, generator: torch.Generator):
        super().__init__()
        self.name, self.layer, self.matrix = spec.name, spec.layer, spec.matrix
        self.input_hook, self.output_hook = spec.input_hook, spec.output_hook
        self.in_heads, self.out_heads = spec.in_heads, spec.out_heads
        self.register_buffer("weight", spec.weight)
        self.register_buffer("bias", spec.bias)
        d_in, d_out = spec.weight.shape
        dtype = spec.weight.dtype
        v = torch.randn(d_in, C, generator=generator, dtype=dtype)
        u = torch.randn(C, d_out, generator=generator, dtype=dtype)
        v, u = v / v.norm(dim=0, keepdim=True), u / u.norm(dim=1, keepdim=True)
        overlap = torch.einsum("ic,io,co->c", v, spec.weight, u)  # SPD paper init
        self.V = nn.Parameter(v)
        self.U = nn.Parameter(u * overlap[:, None])
        self.ci_w1 = nn.Parameter(torch.randn(C, ci_hidden, generator=generator, dtype=dtype) * 2**0.5)
        self.ci_b1 = nn.Parameter(torch.zeros(C, ci_hidden, dtype=dtype))
        self.ci_w2 = nn.Parameter(torch.randn(C, ci_hidden, generator=generator, dtype=dtype)
                                  * ci_hidden**-0.5)
        self.ci_b2 = nn.Parameter(torch.zeros(C, dtype=dtype))

    @property
    def C(self) -> int:
        return self.V.shape[1]

    @property
    def delta(self) -> Float[Tensor, "d_in d_out"]:
        return self.weight - self.V @ self.U

    def describe(self) -> dict:
        return {"name": self.name, "layer": self.layer, "matrix": self.matrix,
                "input_hook": self.input_hook, "output_hook": self.output_hook,
                "in_heads": self.in_heads, "out_heads": self.out_heads, "C": self.C,
                "d_in": self.weight.shape[0], "d_out": self.weight.shape[1],
                "ci_hidden": self.ci_w1.shape[1]}

    def read(self, hook_value: Tensor) -> Float[Tensor, "... d_in"]:
        """The site's input from the value at `input_hook`."""
        return flatten_heads(hook_value, self.in_heads)

    def ci_pre(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... C"]:
        """γ_c(V_c · x) before the sigmoids."""
        hidden = F.gelu((x @ self.V)[..., None] * self.ci_w1 + self.ci_b1)
        return (hidden * self.ci_w2).sum(-1) + self.ci_b2

    def causal_importance(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... C"]:
        """g_c(x) = σ_lower(γ_c(V_c · x)), in [-0.01·|γ|, 1]."""
        return lower_leaky_hard_sigmoid(self.ci_pre(x))

    def outputs(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "C_plus_delta ... d_out"]:
        """Each subcomponent's output `U_c (V_c · x)`, then the delta part `x delta`; with
        `bias` they sum to `x W + b`, the value at `output_hook` (heads flattened)."""
        parts = einops.einsum(x @ self.V, self.U, "... C, C d_out -> C ... d_out")
        return torch.cat([parts, (x @ self.delta)[None]])

    def masked(self, x: Float[Tensor, "... d_in"], clean: Float[Tensor, "... d_out"],
               mask: Float[Tensor, "... C"], delta_mask: Float[Tensor, "..."]) -> Float[Tensor, "... d_out"]:
        """`((x V) ⊙ mask) U + delta_mask · x delta + b`, written as `clean` (= x W + b, the value
        the model computed) minus the masked-out parts, so that all-ones masks return `clean`
        bit for bit."""
        off = ((x @ self.V) * (1 - mask)) @ self.U
        return clean - off - (1 - delta_mask)[..., None] * (x @ self.delta)


class ParamDecomposition(nn.Module):
    """SPD of a TransformerLens model's matrices: one `ParamSite` per site, by name
    (`dec["blocks.0.mlp.W_in"]`), in layer order; `meta` holds the config and measured numbers."""

    def __init__(self, specs: list[SiteSpec], C: int, ci_hidden: int = 16, seed: int = 0,
                 meta: dict | None = None):
        super().__init__()
        if not specs:
            raise DepassError("ParamDecomposition needs at least one site (see find_sites)")
        generator = torch.Generator().manual_seed(seed)
        self.sites = nn.ModuleDict({site_key(s.name): ParamSite(s, C, ci_hidden, generator) for s in specs})
        self.meta = dict(meta or {})

    @classmethod
    def from_model(cls, model: Model, matrices: tuple[str, ...] = ("W_in", "W_out"),
                   layers: tuple[int, ...] | None = None, *, C: int, ci_hidden: int = 16,
                   seed: int = 0) -> "ParamDecomposition":
        return cls(find_sites(model, matrices, layers), C, ci_hidden, seed)

    @property
    def names(self) -> list[str]:
        return [site.name for site in self.sites.values()]

    def __getitem__(self, name: str) -> ParamSite:
        if site_key(name) not in self.sites:
            raise DepassError(f"no decomposed site {name!r}; this decomposition has {self.names}")
        return self.sites[site_key(name)]

    def __iter__(self):
        return iter(self.sites.values())

    def __len__(self) -> int:
        return len(self.sites)

    def causal_importance(self, site: str, x_in: Float[Tensor, "... d_in"]) -> Float[Tensor, "... C"]:
        return self[site].causal_importance(x_in)

    def outputs(self, site: str, x_in: Float[Tensor, "... d_in"]) -> Float[Tensor, "C_plus_delta ... d_out"]:
        return self[site].outputs(x_in)

    def save(self, path: str | Path) -> None:
        """`<path>.safetensors` (every tensor) and `<path>.json` (sites, config, numbers)."""
        saved.save(self, path)

    @classmethod
    def load(cls, path: str | Path) -> "ParamDecomposition":
        """A decomposition written by `save`; a damaged or mismatched pair raises a DepassError
        naming the file (nothing in either file can run code: JSON and safetensors)."""
        return saved.load(cls, path)

    def weight_mismatch(self, model: Model) -> dict[str, float]:
        """max|W_site − W_model| / max|W_model| per site: is this the model it was trained on?"""
        out = {}
        for site in self:
            spec = site_spec(model, site.layer, site.matrix)
            scale = spec.weight.abs().max().clamp_min(1e-30)
            out[site.name] = ((site.weight - spec.weight.to(site.weight)).abs().max() / scale).item()
        return out
