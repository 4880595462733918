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

    def component_jvps(
        self,
        x: Float[Tensor, "batch n_features"],
        factors: Mapping[str, tuple[Float[Tensor, "C d_in m"], Float[Tensor, "C m d_out"]]],
    ) -> Float[Tensor, "batch C n_out"]:
        """`Σ_l Σ_j ∂f_o/∂y_{l,j} · (a_l @ P_{c,l})_j` for every sample, component and output:
        each component's output at every site, pushed forward to the outputs through the
        network's linearisation at `x` (the later layers' weights and ReLU masks).

        It equals contracting the per-sample output Jacobians with the component outputs (as
        `APD.attributions` does for any target), but never builds a Jacobian: the tangent in the
        residual stream is kept as a sum of products `left [C, batch, r] @ right`, whose
        sample-independent right factors (a component's `second`, a layer's `W_out`) go through
        the later layers' `W_in` and `W_U` once; only the `d_mlp`-wide pre-activations and the
        `[batch, C, n_out]` result are per sample.
        """

        def inner(a: Tensor, first: Tensor) -> Tensor:  # a @ first_c: [C, batch, m]
            C, d_in, m = first.shape
            flat = a @ first.permute(1, 0, 2).reshape(d_in, C * m)
            return flat.view(-1, C, m).transpose(0, 1)  # bmm reads it strided

        def add_through(out: Tensor, left: Tensor, right: Tensor) -> None:
            """out [C, batch, d] += left [C, batch, r] @ right ([C, r, d] or shared [r, d])."""
            out.baddbmm_(left, right.expand(left.shape[0], *right.shape[-2:]))

        terms: list[tuple[Tensor, Tensor]] = []  # the residual tangent: Σ left @ right
        resid = x @ self.W_E
        for layer in range(self.cfg.n_layers):
            w_in, w_out = (getattr(self, f"layers__{layer}__{k}") for k in ("W_in", "W_out"))
            first, second = factors[f"layers.{layer}.W_in"]
            pre = torch.bmm(inner(resid, first), second)
            for left, right in terms:
                add_through(pre, left, right @ w_in)
            act = torch.relu(resid @ w_in)
            pre.mul_(act > 0)  # ReLU's derivative, 0 at 0 as autograd takes it
            terms.append((pre, w_out))
            if layer < self.cfg.n_layers - 1:
                first, second = factors[f"layers.{layer}.W_out"]
                terms.append((inner(act, first), second))
            resid = resid + act @ w_out
        # the last W_out's components only meet W_U: act @ (P_c @ W_U), one GEMM over all c
        first, second = factors[f"layers.{self.cfg.n_layers - 1}.W_out"]
        (C, d_mlp, _), n_out = first.shape, self.W_U.shape[1]
        last = torch.bmm(first, second @ self.W_U).permute(1, 0, 2).reshape(d_mlp, C * n_out)
        out = (act @ last).view(-1, C, n_out)  # [batch, C, n_out]
        for left, right in terms:
            add_through(out.transpose(0, 1), left, right @ self.W_U)
        return out

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
