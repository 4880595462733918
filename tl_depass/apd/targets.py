"""Toy target models (x @ W convention) and their sparse-feature data.

A target names its decomposed matrices and the *sites* where they are used: tied TMS uses one
matrix `W` twice (`W` as is in the encoder, transposed in the decoder). `run` accepts, per site,
a function that replaces `a @ W_site`; this is how APD and SPD run the target's architecture with
their own parameters. Biases and fixed embeddings are never decomposed.
"""

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal

import torch
from jaxtyping import Float
from torch import Tensor, nn

from tl_depass.apd.configs import ResidualMLPConfig, TMSConfig

__all__ = [
    "Site",
    "ToyRun",
    "ToyTarget",
    "TMS",
    "ResidualMLP",
    "LinearFn",
    "sparse_features",
    "make_target",
]

LinearFn = Callable[[Tensor], Tensor]
_TARGET_WEIGHTS: Mapping[str, LinearFn] = MappingProxyType({})  # no site replaced


@dataclass(frozen=True)
class Site:
    """One use of a decomposed matrix: `a @ W` (as_is) or `a @ Wᵀ` (transposed)."""

    name: str
    matrix: str
    orientation: Literal["as_is", "transposed"]


@dataclass
class ToyRun:
    """A forward pass: the output, each site's input and output, post-ReLU hidden activations."""

    output: Tensor
    inputs: dict[str, Tensor]
    outputs: dict[str, Tensor]
    hidden: dict[str, Tensor]


def sparse_features(
    batch: int, n_features: int, p: float, low: float, high: float, generator: torch.Generator
) -> Float[Tensor, "batch n_features"]:
    """Each feature is present with probability p, then uniform on [low, high]."""
    device = generator.device  # drawn where the generator lives (CPU or GPU)
    present = torch.rand(batch, n_features, generator=generator, device=device) < p
    values = low + (high - low) * torch.rand(batch, n_features, generator=generator, device=device)
    return values * present


class ToyTarget(nn.Module):
    """Base class: subclasses set `sites`, register their matrices and define `_forward`."""

    sites: tuple[Site, ...]
    n_features: int

    def matrices(self) -> dict[str, Tensor]:
        """The decomposed matrices by name, x @ W convention."""
        return {name: getattr(self, name.replace(".", "__")) for name in self.matrix_names}

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def matrix_names(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(site.matrix for site in self.sites))

    def site_weight(self, site: Site) -> Tensor:
        weight = getattr(self, site.matrix.replace(".", "__"))
        return weight if site.orientation == "as_is" else weight.T

    def run(
        self,
        x: Float[Tensor, "batch n_features"],
        linear: Mapping[str, LinearFn] = _TARGET_WEIGHTS,
    ) -> ToyRun:
        """Forward pass; `linear[site]` replaces `a @ W_site` at the sites it names."""
        unknown = set(linear) - {s.name for s in self.sites}
        if unknown:
            raise KeyError(
                f"Unknown sites {sorted(unknown)}; this target has {[s.name for s in self.sites]}."
            )
        record = ToyRun(output=x, inputs={}, outputs={}, hidden={})

        def apply(name: str, a: Tensor) -> Tensor:
            site = next(s for s in self.sites if s.name == name)
            record.inputs[name] = a
            out = linear[name](a) if name in linear else a @ self.site_weight(site)
            record.outputs[name] = out
            return out

        record.output = self._forward(x, apply, record.hidden)
        return record

    def forward(self, x: Float[Tensor, "batch n_features"]) -> Float[Tensor, "batch n_out"]:
        return self.run(x).output

    def _forward(self, x: Tensor, apply: Callable[[str, Tensor], Tensor], hidden: dict) -> Tensor:
        raise NotImplementedError

    def sample(self, batch: int, generator: torch.Generator) -> Tensor:
        raise NotImplementedError

    def labels(self, x: Tensor) -> Tensor:
        raise NotImplementedError


class TMS(ToyTarget):
    """`x̂ = ReLU(Wᵀ W x + b)` with tied weights; "+ID" adds a fixed identity hidden layer."""

    def __init__(self, cfg: TMSConfig, generator: torch.Generator):
        super().__init__()
        self.cfg = cfg
        self.n_features = cfg.n_features
        w = torch.empty(cfg.n_features, cfg.n_hidden)
        bound = (6.0 / cfg.n_features) ** 0.5  # xavier-like; the toy is insensitive to this
        w.uniform_(-bound, bound, generator=generator)
        self.W = nn.Parameter(w)
        self.b_final = nn.Parameter(torch.zeros(cfg.n_features))
        sites = [Site("W", "W", "as_is")]
        if cfg.hidden_identity == "identity":
            self.register_buffer("hidden", torch.eye(cfg.n_hidden))
            sites.append(Site("hidden", "hidden", "as_is"))
        sites.append(Site("W_T", "W", "transposed"))
        self.sites = tuple(sites)

    def _forward(self, x: Tensor, apply: Callable[[str, Tensor], Tensor], hidden: dict) -> Tensor:
        h = apply("W", x)
        if self.cfg.hidden_identity == "identity":
            h = apply("hidden", h)
        return torch.relu(apply("W_T", h) + self.b_final)

    def sample(self, batch: int, generator: torch.Generator) -> Tensor:
        return sparse_features(batch, self.n_features, self.cfg.feature_prob, 0.0, 1.0, generator)

    def labels(self, x: Tensor) -> Tensor:
        return x


class ResidualMLP(ToyTarget):
    """Residual MLP computing `x + ReLU(x)` for 100 features through 50 neurons, no biases.

    `W_E` is fixed with unit-norm rows and `W_U = W_Eᵀ`; only `W_in`, `W_out` are trained and
    decomposed.
    """

    def __init__(self, cfg: ResidualMLPConfig, generator: torch.Generator):
        super().__init__()
        self.cfg = cfg
        self.n_features = cfg.n_features
        w_e = torch.randn(cfg.n_features, cfg.d_embed, generator=generator)
        self.register_buffer("W_E", w_e / w_e.norm(dim=-1, keepdim=True))
        sites = []
        for layer in range(cfg.n_layers):
            w_in = (
                torch.randn(cfg.d_embed, cfg.d_mlp, generator=generator)
                * (2.0 / cfg.d_embed) ** 0.5
            )
            w_out = (
                torch.randn(cfg.d_mlp, cfg.d_embed, generator=generator) * (1.0 / cfg.d_mlp) ** 0.5
            )
            setattr(self, f"layers__{layer}__W_in", nn.Parameter(w_in))
            setattr(self, f"layers__{layer}__W_out", nn.Parameter(w_out))
            for kind in ("W_in", "W_out"):
                name = f"layers.{layer}.{kind}"
                sites.append(Site(name, name, "as_is"))
        self.sites = tuple(sites)

    @property
    def W_U(self) -> Tensor:
        return self.W_E.T

    def _forward(self, x: Tensor, apply: Callable[[str, Tensor], Tensor], hidden: dict) -> Tensor:
        resid = x @ self.W_E
        for layer in range(self.cfg.n_layers):
            act = torch.relu(apply(f"layers.{layer}.W_in", resid))
            hidden[f"layers.{layer}"] = act
            resid = resid + apply(f"layers.{layer}.W_out", act)
        return resid @ self.W_U

    def sample(self, batch: int, generator: torch.Generator) -> Tensor:
        return sparse_features(batch, self.n_features, self.cfg.feature_prob, -1.0, 1.0, generator)

    def labels(self, x: Tensor) -> Tensor:
        return x + torch.relu(x)


def make_target(cfg: TMSConfig | ResidualMLPConfig) -> ToyTarget:
    """A freshly initialised target, deterministic in `cfg.seed`."""
    generator = torch.Generator().manual_seed(cfg.seed)
    if isinstance(cfg, TMSConfig):
        return TMS(cfg, generator)
    if isinstance(cfg, ResidualMLPConfig):
        return ResidualMLP(cfg, generator)
    raise TypeError(
        f"Unknown target config {type(cfg).__name__}; expected TMSConfig or ResidualMLPConfig."
    )
