"""Frozen configurations for the toy targets, APD and SPD, with the papers' values as presets.

Every config validates itself on construction and raises `ConfigError` with what is wrong and
how to fix it. The papers' values live in `presets.py`; derive variants with
`dataclasses.replace`.
"""

from dataclasses import dataclass, field
from typing import Literal

__all__ = [
    "ConfigError",
    "OptimConfig",
    "TMSConfig",
    "ResidualMLPConfig",
    "APDConfig",
    "SPDConfig",
    "ExperimentConfig",
    "TargetConfig",
    "MethodConfig",
]


class ConfigError(ValueError):
    """A configuration value is out of range or inconsistent with another one."""


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


@dataclass(frozen=True)
class OptimConfig:
    """Optimiser, schedule and run length. `warmup_frac` is a fraction of `steps`."""

    lr: float
    steps: int
    batch_size: int
    schedule: Literal["constant", "cosine", "linear"] = "constant"
    warmup_frac: float = 0.0
    optimizer: Literal["adam", "adamw"] = "adam"
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        _require(self.lr > 0, f"OptimConfig.lr must be > 0, got {self.lr}.")
        _require(self.steps >= 1, f"OptimConfig.steps must be >= 1, got {self.steps}.")
        _require(
            self.batch_size >= 1, f"OptimConfig.batch_size must be >= 1, got {self.batch_size}."
        )
        _require(
            0.0 <= self.warmup_frac < 1.0,
            f"OptimConfig.warmup_frac must be in [0, 1), got {self.warmup_frac}.",
        )
        _require(
            self.schedule in ("constant", "cosine", "linear"),
            "OptimConfig.schedule must be 'constant', 'cosine' or 'linear', "
            f"got {self.schedule!r}.",
        )
        _require(
            self.optimizer in ("adam", "adamw"),
            f"OptimConfig.optimizer must be 'adam' or 'adamw', got {self.optimizer!r}.",
        )
        _require(
            self.weight_decay >= 0,
            f"OptimConfig.weight_decay must be >= 0, got {self.weight_decay}.",
        )


@dataclass(frozen=True)
class TMSConfig:
    """Toy Model of Superposition `x̂ = ReLU(Wᵀ W x + b)`, tied weights.

    `hidden_identity="identity"` inserts a fixed identity matrix between encoder and decoder
    (the papers' "+ID" variant); it is frozen in the target and decomposed like any matrix.
    """

    n_features: int
    n_hidden: int
    hidden_identity: Literal["none", "identity"] = "none"
    feature_prob: float = 0.05
    train: OptimConfig = field(
        default_factory=lambda: OptimConfig(
            lr=5e-3, steps=5_000, batch_size=1024, optimizer="adamw", weight_decay=0.01
        )
    )
    seed: int = 0

    def __post_init__(self) -> None:
        _require(self.n_features >= 1, f"TMSConfig.n_features must be >= 1, got {self.n_features}.")
        _require(self.n_hidden >= 1, f"TMSConfig.n_hidden must be >= 1, got {self.n_hidden}.")
        _require(
            self.hidden_identity in ("none", "identity"),
            "TMSConfig.hidden_identity must be 'none' or 'identity', "
            f"got {self.hidden_identity!r}.",
        )
        _require(
            0.0 < self.feature_prob <= 1.0,
            f"TMSConfig.feature_prob must be in (0, 1], got {self.feature_prob}.",
        )


@dataclass(frozen=True)
class ResidualMLPConfig:
    """Residual MLP for compressed computation: labels `x + ReLU(x)`, no biases.

    `W_E` is fixed, random with unit-norm rows; `W_U = W_Eᵀ`. `d_mlp` is per layer.
    """

    n_features: int = 100
    d_embed: int = 1000
    d_mlp: int = 50
    n_layers: int = 1
    feature_prob: float = 0.01
    train: OptimConfig = field(
        default_factory=lambda: OptimConfig(
            lr=3e-3,
            steps=10_000,
            batch_size=2048,
            schedule="cosine",
            optimizer="adamw",
            weight_decay=0.01,
        )
    )
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("n_features", "d_embed", "d_mlp", "n_layers"):
            value = getattr(self, name)
            _require(value >= 1, f"ResidualMLPConfig.{name} must be >= 1, got {value}.")
        _require(
            0.0 < self.feature_prob <= 1.0,
            f"ResidualMLPConfig.feature_prob must be in (0, 1], got {self.feature_prob}.",
        )


TargetConfig = TMSConfig | ResidualMLPConfig


@dataclass(frozen=True)
class APDConfig:
    """Attribution-based Parameter Decomposition (Braun et al. 2025).

    `C` components each span every decomposed matrix with rank `m` (`None`: full rank,
    min(d_in, d_out) per matrix). `topk` is the average number of active components per sample
    (batch top-k). Coefficients: faithfulness, minimality (top-k output MSE), hidden-activation
    reconstruction, Schatten-p simplicity. `init`: "fan_in" draws each factor uniformly with
    bound √(6 / fan-in)/2 of its own matrix; "xavier" is the reference code's: normal with
    std √(2 / ((C + 1)·d_in·m)) for A and √(2 / ((C + 1)·m·d_out)) for B (PyTorch's Xavier fans of
    its `[instances, C, d_in, m]` parameters, one instance): √((C + 1)·m)/2 times smaller in A,
    √((C + 1)·d_out)/2 in B.
    """

    C: int
    m: int | None
    topk: float
    optim: OptimConfig
    faithfulness_coeff: float = 1.0
    minimality_coeff: float = 1.0
    act_recon_coeff: float = 0.0
    simplicity_coeff: float = 1.0
    p: float = 1.0
    attribution: Literal["gradient", "ablation", "activation"] = "gradient"
    a_norm: Literal["free", "unit"] = "free"
    init: Literal["fan_in", "xavier"] = "fan_in"
    seed: int = 0

    def __post_init__(self) -> None:
        _require(self.C >= 1, f"APDConfig.C must be >= 1, got {self.C}.")
        _require(self.m is None or self.m >= 1, f"APDConfig.m must be >= 1 or None, got {self.m}.")
        _require(
            0.0 < self.topk <= self.C,
            f"APDConfig.topk (mean active components per sample) must be in (0, C={self.C}], "
            f"got {self.topk}.",
        )
        _require(
            self.topk * self.optim.batch_size >= 1,
            f"APDConfig.topk * batch_size = {self.topk * self.optim.batch_size} keeps no "
            "component; "
            "raise topk or batch_size.",
        )
        for name in (
            "faithfulness_coeff",
            "minimality_coeff",
            "act_recon_coeff",
            "simplicity_coeff",
        ):
            _require(getattr(self, name) >= 0, f"APDConfig.{name} must be >= 0.")
        _require(self.p > 0, f"APDConfig.p must be > 0, got {self.p}.")
        _require(
            self.attribution in ("gradient", "ablation", "activation"),
            f"APDConfig.attribution must be 'gradient', 'ablation' or 'activation', "
            f"got {self.attribution!r}.",
        )
        _require(
            self.a_norm in ("free", "unit"),
            f"APDConfig.a_norm must be 'free' or 'unit', got {self.a_norm!r}.",
        )
        _require(
            self.init in ("fan_in", "xavier"),
            f"APDConfig.init must be 'fan_in' or 'xavier', got {self.init!r}.",
        )


@dataclass(frozen=True)
class SPDConfig:
    """Stochastic Parameter Decomposition (Bushnaq, Braun, Sharkey 2025).

    `C` rank-one subcomponents per decomposed matrix; causal importance from one tiny MLP
    (1 → `ci_hidden` GELU → 1) per subcomponent. `delta="masked"` adds `W − Σ UV` as one extra,
    randomly masked part (later reference code); the paper has none.
    """

    C: int
    optim: OptimConfig
    faithfulness_coeff: float = 1.0
    stochastic_recon_coeff: float = 1.0
    layerwise_recon_coeff: float = 1.0
    importance_coeff: float = 3e-3
    p: float = 1.0
    ci_hidden: int = 16
    n_mask_samples: int = 1
    delta: Literal["none", "masked"] = "none"
    seed: int = 0

    def __post_init__(self) -> None:
        _require(self.C >= 1, f"SPDConfig.C must be >= 1, got {self.C}.")
        _require(self.ci_hidden >= 1, f"SPDConfig.ci_hidden must be >= 1, got {self.ci_hidden}.")
        _require(
            self.n_mask_samples >= 1,
            f"SPDConfig.n_mask_samples must be >= 1, got {self.n_mask_samples}.",
        )
        for name in (
            "faithfulness_coeff",
            "stochastic_recon_coeff",
            "layerwise_recon_coeff",
            "importance_coeff",
        ):
            _require(getattr(self, name) >= 0, f"SPDConfig.{name} must be >= 0.")
        _require(self.p > 0, f"SPDConfig.p must be > 0, got {self.p}.")
        _require(
            self.delta in ("none", "masked"),
            f"SPDConfig.delta must be 'none' or 'masked', got {self.delta!r}.",
        )


MethodConfig = APDConfig | SPDConfig


@dataclass(frozen=True)
class ExperimentConfig:
    """One reproduction: a target to train and a decomposition method to run on it."""

    name: str
    target: TargetConfig
    method: MethodConfig

    def __post_init__(self) -> None:
        if isinstance(self.method, APDConfig) and self.method.m is not None:
            smallest = (
                min(self.target.n_features, self.target.n_hidden)
                if isinstance(self.target, TMSConfig)
                else min(self.target.d_embed, self.target.d_mlp)
            )
            _require(
                self.method.m <= smallest + 1,
                f"{self.name}: APD rank m={self.method.m} exceeds the largest useful rank "
                f"{smallest + 1}; use m=None for full rank.",
            )
