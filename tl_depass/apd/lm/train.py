"""Training SPD on a TransformerLens model: the masked forward, the losses, a config, `train_spd`.

Losses (Bushnaq, Braun, Sharkey 2025), on prompts from `tl_depass.models.tasks.generate(cfg.task)`:
faithfulness `Σ ‖W − V U‖² / #elements`; stochastic reconstruction `KL(target ‖ masked)` of the
next-token distributions with every site masked by `g + (1 − g)·r` (r ~ U(0, 1)) and the delta
part by an independent `r`; the same with one site masked at a time, averaged over sites; and
importance minimality `Σ_sites Σ_c σ_upper(γ_c)^p`. Causal importances `g` are computed on the
clean model's own inputs to each site; the masked forward reads the (masked) model's current input.

    python -m tl_depass.apd.lm.train --out tl_depass/models/recall_spd

rebuilds the shipped decomposition of the bundled recall model (W_in, W_out, W_V, W_O of both
layers; 3000 steps, about 16 minutes on one shared CPU thread).
"""

import argparse
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from tl_depass.apd.configs import ConfigError, OptimConfig
from tl_depass.apd.lm.sites import MATRICES, find_sites, flatten_heads, unflatten_heads
from tl_depass.apd.lm.transformer import ParamDecomposition
from tl_depass.apd.spd import lower_leaky_hard_sigmoid, upper_leaky_hard_sigmoid
from tl_depass.apd.train import train
from tl_depass.engine.backends import Model

__all__ = ["TransformerSPDConfig", "masked_logits", "site_inputs", "train_spd", "evaluate"]


@dataclass(frozen=True)
class TransformerSPDConfig:
    """SPD of `matrices` in `layers` (None: all) with `C` rank-one subcomponents per site.
    `positions`: where the KL and the importance loss are taken ("all": every next-token
    prediction, as in the SPD paper; "last": the task's answer only). `layerwise_sites="one"`
    masks one site drawn at random per step (an unbiased estimate of the layerwise average at
    the cost of one forward; "all" runs one forward per site)."""

    task: str = "recall"
    matrices: tuple[str, ...] = ("W_in", "W_out")
    layers: tuple[int, ...] | None = None
    C: int = 64
    ci_hidden: int = 16
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(
        lr=2e-3, steps=3000, batch_size=64, schedule="cosine", warmup_frac=0.01))
    faithfulness_coeff: float = 1e3
    stochastic_recon_coeff: float = 1.0
    layerwise_recon_coeff: float = 1.0
    importance_coeff: float = 3e-3
    p: float = 1.0
    positions: Literal["all", "last"] = "all"
    n_mask_samples: int = 1
    layerwise_sites: Literal["all", "one"] = "one"
    faithfulness_warmup_steps: int = 200
    seed: int = 0

    def __post_init__(self) -> None:
        from tl_depass.models.tasks import TASKS

        checks = [
            (self.task in TASKS, f"task must be one of {sorted(TASKS)}, got {self.task!r}"),
            (bool(self.matrices) and all(m in MATRICES for m in self.matrices),
             f"matrices must be a non-empty tuple of {MATRICES}, got {self.matrices}"),
            (self.C >= 1 and self.ci_hidden >= 1, "C and ci_hidden must be >= 1"),
            (self.positions in ("all", "last"), f"positions must be 'all' or 'last', got {self.positions!r}"),
            (self.n_mask_samples >= 1, "n_mask_samples must be >= 1"),
            (self.layerwise_sites in ("all", "one"),
             f"layerwise_sites must be 'all' or 'one', got {self.layerwise_sites!r}"),
            (self.faithfulness_warmup_steps >= 0, "faithfulness_warmup_steps must be >= 0"),
            (self.p > 0, f"p must be > 0, got {self.p}"),
            (min(self.faithfulness_coeff, self.stochastic_recon_coeff, self.layerwise_recon_coeff,
                 self.importance_coeff) >= 0, "loss coefficients must be >= 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(f"TransformerSPDConfig: {message}")


def site_inputs(model: Model, dec: ParamDecomposition, tokens: Int[Tensor, "batch pos"]
                ) -> tuple[Tensor, dict[str, Float[Tensor, "batch pos d_in"]]]:
    """The clean model's logits and each site's input (no gradients)."""
    hooks = {site.input_hook for site in dec}
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens, names_filter=lambda name: name in hooks)
    return logits, {site.name: site.read(cache[site.input_hook]) for site in dec}


def masked_logits(model: Model, dec: ParamDecomposition, tokens: Int[Tensor, "batch pos"],
                  masks: dict[str, Float[Tensor, "batch pos C"]],
                  delta_masks: dict[str, Float[Tensor, "batch pos"]]) -> Float[Tensor, "batch pos d_vocab"]:
    """The model's logits with each site in `masks` computing `((x V) ⊙ m) U + m_δ · x Δ + b` from
    its current input x; sites not in `masks` (and everything else) run as in the model."""
    inputs: dict[str, Tensor] = {}
    hooks = []
    for site in dec:
        if site.name not in masks:
            continue

        def read(value, hook, site=site):
            inputs[site.name] = site.read(value)

        def write(value, hook, site=site):
            flat = flatten_heads(value, site.out_heads)
            out = site.masked(inputs[site.name], flat, masks[site.name], delta_masks[site.name])
            return unflatten_heads(out, site.out_heads)

        hooks += [(site.input_hook, read), (site.output_hook, write)]
    return model.run_with_hooks(tokens, fwd_hooks=hooks)


def kl_divergence(target: Tensor, other: Tensor) -> Float[Tensor, "batch pos"]:
    """KL(softmax(target) ‖ softmax(other)) per prediction."""
    log_t, log_o = target.log_softmax(-1), other.log_softmax(-1)
    return (log_t.exp() * (log_t - log_o)).sum(-1)


class TransformerSPD(nn.Module):
    """The objective `apd.train.train` optimises; only `dec` is trained (the model is frozen)."""

    def __init__(self, model: Model, dec: ParamDecomposition, cfg: TransformerSPDConfig):
        super().__init__()
        self.__dict__["model"] = model  # not a submodule: neither trained nor checkpointed
        self.dec, self.cfg = dec, cfg

    def _select(self, t: Tensor) -> Tensor:
        return t[:, -1:] if self.cfg.positions == "last" else t

    def _masks(self, ci: dict[str, Tensor], generator: torch.Generator):
        masks = {k: g + (1 - g) * torch.rand(g.shape, generator=generator, dtype=g.dtype)
                 for k, g in ci.items()}
        deltas = {k: torch.rand(g.shape[:-1], generator=generator, dtype=g.dtype) for k, g in ci.items()}
        return masks, deltas

    def faithfulness_loss(self) -> Tensor:
        total = sum(site.delta.pow(2).sum() for site in self.dec)
        return total / sum(site.weight.numel() for site in self.dec)

    def training_loss(self, tokens: Tensor, generator: torch.Generator) -> tuple[Tensor, dict[str, float]]:
        cfg, model = self.cfg, self.model
        clean, inputs = site_inputs(model, self.dec, tokens)
        pre = {site.name: site.ci_pre(inputs[site.name]) for site in self.dec}
        ci = {k: lower_leaky_hard_sigmoid(v) for k, v in pre.items()}
        target = self._select(clean)
        stochastic, layerwise = 0.0, 0.0
        for _ in range(cfg.n_mask_samples):
            masks, deltas = self._masks(ci, generator)
            out = masked_logits(model, self.dec, tokens, masks, deltas)
            stochastic = stochastic + kl_divergence(target, self._select(out)).mean()
            if cfg.layerwise_recon_coeff > 0:
                names = self.dec.names
                if cfg.layerwise_sites == "one":
                    names = [names[int(torch.randint(len(names), (), generator=generator))]]
                for name in names:
                    masks, deltas = self._masks({name: ci[name]}, generator)
                    out = masked_logits(model, self.dec, tokens, masks, deltas)
                    layerwise = layerwise + kl_divergence(target, self._select(out)).mean() / len(names)
        stochastic = stochastic / cfg.n_mask_samples
        layerwise = layerwise / cfg.n_mask_samples
        faith = self.faithfulness_loss()
        importance = sum(self._select(upper_leaky_hard_sigmoid(g)).abs().pow(cfg.p).sum(-1)
                         for g in pre.values()).mean()
        loss = (cfg.faithfulness_coeff * faith + cfg.stochastic_recon_coeff * stochastic
                + cfg.layerwise_recon_coeff * layerwise + cfg.importance_coeff * importance)
        metrics = {"faithfulness": faith.item(), "stochastic_recon": _scalar(stochastic),
                   "layerwise_recon": _scalar(layerwise), "importance_minimality": importance.item(),
                   "ci_l0": sum((self._select(g) > 0.1).float().sum(-1).mean().item() for g in ci.values()),
                   "loss": loss.item()}
        return loss, metrics

    def before_optimizer_step(self) -> None:
        pass


def _scalar(value: Tensor | float) -> float:
    return float(torch.as_tensor(value).detach())


def _warm_up_faithfulness(dec: ParamDecomposition, steps: int) -> None:
    """A short faithfulness-only fit of V, U (later SPD code: 200 steps, lr 0.01)."""
    if steps == 0:
        return
    params = [p for site in dec for p in (site.V, site.U)]
    optimizer = torch.optim.Adam(params, lr=0.01)
    count = sum(site.weight.numel() for site in dec)
    for _ in range(steps):
        loss = sum(site.delta.pow(2).sum() for site in dec) / count
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def train_spd(model: Model, cfg: TransformerSPDConfig, *, run_dir: Path | None = None,
              progress: Literal["bar", "none"] = "bar", log_every: int = 100) -> ParamDecomposition:
    """SPD of `model` (a HookedTransformer or TransformerBridge on `cfg.task`'s vocabulary);
    deterministic for `cfg.seed`. The model's parameters are left as they were."""
    from tl_depass.models.tasks import generate

    dec = ParamDecomposition(find_sites(model, cfg.matrices, cfg.layers), cfg.C, cfg.ci_hidden, cfg.seed)
    _warm_up_faithfulness(dec, cfg.faithfulness_warmup_steps)

    def sample(n: int, generator: torch.Generator) -> Tensor:
        return generate(cfg.task, n, int(torch.randint(2**31 - 1, (), generator=generator))).tokens

    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    model.requires_grad_(False)
    start = time.perf_counter()
    try:
        history = train(TransformerSPD(model, dec, cfg), sample, cfg.optim, cfg.seed, run_dir,
                        log_every=log_every, progress=progress, description="SPD")
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(flags[name])
    dec.meta = {"config": asdict(cfg), "train_wall_s": round(time.perf_counter() - start, 1),
                "threads": torch.get_num_threads(), "history": history[-1:] if history else []}
    return dec


@torch.no_grad()
def evaluate(model: Model, dec: ParamDecomposition, tokens: Int[Tensor, "batch pos"],
             answers: Int[Tensor, " batch"], threshold: float = 0.1) -> dict:
    """KL(target ‖ masked) of the all-ones masks (exact: 0), of the causal-importance masks
    with and without the delta part, and with every subcomponent off; answer accuracy at the
    last position; per site: mean CI-L0 (CI > threshold) over all and last positions, alive
    subcomponents (CI > threshold somewhere), ‖Δ‖/‖W‖."""
    clean, inputs = site_inputs(model, dec, tokens)
    ci = {site.name: site.causal_importance(inputs[site.name]) for site in dec}

    def run(masks, delta_value: float) -> Tensor:
        deltas = {k: torch.full(m.shape[:-1], delta_value, dtype=m.dtype) for k, m in masks.items()}
        return masked_logits(model, dec, tokens, masks, deltas)

    def summary(logits: Tensor) -> dict:
        kl = kl_divergence(clean, logits)
        return {"kl": kl.mean().item(), "kl_last": kl[:, -1].mean().item(),
                "accuracy": (logits[:, -1].argmax(-1) == answers).float().mean().item()}

    ones = {k: torch.ones_like(g) for k, g in ci.items()}
    out = {"target_accuracy": (clean[:, -1].argmax(-1) == answers).float().mean().item(),
           "all_ones": summary(run(ones, 1.0)),
           "ci_masked": summary(run(ci, 0.0)),
           "ci_masked_with_delta": summary(run(ci, 1.0)),
           "all_off": summary(run({k: torch.zeros_like(g) for k, g in ci.items()}, 0.0)),
           "sites": {}}
    for site in dec:
        active = ci[site.name] > threshold
        out["sites"][site.name] = {
            "C": site.C, "ci_l0": active.float().sum(-1).mean().item(),
            "ci_l0_last": active[:, -1].float().sum(-1).mean().item(),
            "alive": int(active.flatten(0, -2).any(0).sum()),
            "delta_rel": (site.delta.norm() / site.weight.norm()).item()}
    return out


def main(argv: list[str] | None = None) -> None:
    import json

    import tl_depass.models
    from tl_depass.models.tasks import generate

    parser = argparse.ArgumentParser(description="SPD of a bundled model's MLP matrices")
    parser.add_argument("--model", default="recall")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--C", type=int, default=64)
    parser.add_argument("--importance", type=float, default=3e-3)
    parser.add_argument("--p", type=float, default=1.0)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--matrices", default="W_in,W_out,W_V,W_O")
    parser.add_argument("--positions", default="all", choices=("all", "last"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--faithfulness", type=float, default=1e3)
    parser.add_argument("--out", type=Path, default=None, help="save as OUT.safetensors/.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    model = tl_depass.models.load(args.model)
    cfg = TransformerSPDConfig(
        task=tl_depass.models.info(args.model)["task"], matrices=tuple(args.matrices.split(",")),
        C=args.C, importance_coeff=args.importance, p=args.p,
        faithfulness_coeff=args.faithfulness, positions=args.positions, seed=args.seed,
        optim=OptimConfig(lr=args.lr, steps=args.steps, batch_size=64, schedule="cosine", warmup_frac=0.01))
    dec = train_spd(model, cfg)
    batch = generate(cfg.task, 512, seed=123_456)
    result = evaluate(model, dec, batch.tokens, batch.answers)
    dec.meta.update(model=args.model, weight_processing="none (models.load: raw state dict); norm "
                    "weights and biases folded into W_in/W_V as the sites read ln*.hook_normalized",
                    eval={"prompts": 512, "seed": 123_456, **result})
    print(json.dumps({k: v for k, v in dec.meta.items() if k != "history"} | {"last": dec.meta["history"]},
                     indent=1))
    if args.out is not None:
        dec.save(args.out)


if __name__ == "__main__":
    main()
