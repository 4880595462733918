"""Reproduction runs, one command each:

    python -m tl_depass.apd.reproduce tms-5-2 --method spd --seed 0

Trains the target (checkpointed, resumable), decomposes it (checkpointed, resumable), evaluates,
writes `results.json` into the run folder and figures into `--figures`. `--steps` shortens the
decomposition; the result records which settings actually ran.
"""

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import Literal

import torch

from tl_depass import commands
from tl_depass.apd.apd import APD
from tl_depass.apd.configs import APDConfig, ConfigError, ExperimentConfig, TMSConfig
from tl_depass.apd.experiments.plots import (
    plot_ci_heatmaps,
    plot_neuron_contributions,
    plot_norms,
    plot_tms_vectors,
    save,
)
from tl_depass.apd.experiments.presets import overridden, preset, shortened
from tl_depass.apd.metrics import (
    RESIDUAL_ONE_HOT,
    alive_count,
    apd_top1_mse,
    ci_l0,
    component_weights,
    layer_contributions,
    layer_shares,
    loss_scores,
    mmcs_ml2r,
    one_hot_causal_importance,
    subcomponent_norms,
    top1_components,
)
from tl_depass.apd.spd import SPD
from tl_depass.apd.targets import ResidualMLP, ToyTarget, make_target
from tl_depass.apd.train import CHECKPOINT_NAME, TargetObjective, load_checkpoint, train
from tl_depass.errors import DepassError

__all__ = ["with_seed", "run_experiment", "evaluate", "main"]


def with_seed(
    config: ExperimentConfig, seed: int, decomposition_seed: int | None = None
) -> ExperimentConfig:
    """Same experiment, target seeded with `seed`, decomposition (initialisation and data
    stream) with `decomposition_seed` (default: `seed`)."""
    return dataclasses.replace(
        config,
        target=dataclasses.replace(config.target, seed=seed),
        method=dataclasses.replace(
            config.method, seed=seed if decomposition_seed is None else decomposition_seed
        ),
    )


def with_target_steps(config: ExperimentConfig, steps: int | None) -> ExperimentConfig:
    """Same experiment, the target trained for `steps` steps (None: as the preset)."""
    if steps is None:
        return config
    train_cfg = dataclasses.replace(config.target.train, steps=steps)
    return dataclasses.replace(config, target=dataclasses.replace(config.target, train=train_cfg))


def target_dir(runs: Path, config: ExperimentConfig) -> Path:
    """The target's run folder under `runs` (shared by every method and setting of a seed)."""
    group = runs / config.name.replace("/", "-").rsplit("-", 1)[0]
    return group / f"target_seed{config.target.seed}_steps{config.target.train.steps}"


def train_target(
    config: ExperimentConfig,
    run_dir: Path | None,
    progress: Literal["bar", "none"],
    device: str = "cpu",
) -> tuple[ToyTarget, float]:
    """The trained target and its final training loss."""
    target = make_target(config.target).to(device)
    history = train(
        TargetObjective(target),
        target.sample,
        config.target.train,
        seed=config.target.seed,
        run_dir=run_dir,
        progress=progress,
        description="target",
    )
    return target, float(history[-1]["loss"]) if history else float("nan")


def decompose(
    config: ExperimentConfig,
    target: ToyTarget,
    run_dir: Path | None,
    progress: Literal["bar", "none"],
    stop_at: int | None = None,
) -> tuple[APD | SPD, list[dict[str, float | int]]]:
    """Decompose `target` on its device; `stop_at` ends early (resumable from the checkpoint in
    `run_dir`)."""
    kind = APD if isinstance(config.method, APDConfig) else SPD
    method = kind(target, config.method)
    history = train(
        method,
        target.sample,
        config.method.optim,
        seed=config.method.seed + 10_000,  # data stream independent of the target's
        run_dir=run_dir,
        stop_at=stop_at,
        progress=progress,
        description=config.name,
    )
    return method, history


@torch.no_grad()
def evaluate(method: APD | SPD, figures: Path | None, tag: str) -> dict:
    """The issue's metrics for this target; figures saved as `<figures>/<tag>_*.png`."""
    target = method.target
    out: dict = {}
    norms = {m: subcomponent_norms(method, m) for m in target.matrix_names}
    out["alive"] = {m: alive_count(method, m) for m in target.matrix_names}
    out["norms"] = {m: sorted(n.tolist(), reverse=True)[:12] for m, n in norms.items()}
    out["faithfulness"] = method.faithfulness_loss().item()
    if figures is not None:
        figures.mkdir(parents=True, exist_ok=True)
        save(plot_norms(norms, f"{tag}: weight norms"), figures / f"{tag}_norms.png")
    eval_x = target.sample(10_000, torch.Generator().manual_seed(123))
    if isinstance(target.cfg, TMSConfig):
        match = mmcs_ml2r(target.W.detach(), component_weights(method, "W"))
        out["mmcs"], out["ml2r"] = match.mmcs, match.ml2r
        out["best_component_per_feature"] = match.best.tolist()
        if figures is not None and target.cfg.n_hidden == 2:
            fig = plot_tms_vectors(target.W.detach(), component_weights(method, "W"), tag)
            save(fig, figures / f"{tag}_features.png")
    value = RESIDUAL_ONE_HOT if isinstance(target, ResidualMLP) else 1.0  # one-hot inputs
    if isinstance(method, SPD):
        out["ci_l0"] = ci_l0(method, eval_x)
        ci = one_hot_causal_importance(method, value)
        out["one_hot_ci"] = {
            site: {
                "features_with_a_subcomponent": int((g.max(-1).values > 0.1).sum()),
                "distinct_argmax_subcomponents": len(set(g.argmax(-1).tolist())),
                "always_on_subcomponents": int((g > 0.5).float().mean(0).ge(0.9).sum()),
                "ever_important_subcomponents": int((g > 0.1).any(0).sum()),
                "important_per_input": (g > 0.1).float().sum(-1).mean().item(),
            }
            for site, g in ci.items()
        }
        stoch = method.training_loss(eval_x, torch.Generator().manual_seed(7))[1]
        out["eval_losses"] = stoch
        if figures is not None:
            save(
                plot_ci_heatmaps(ci, f"{tag}: causal importance, one-hot x={value}"),
                figures / f"{tag}_ci.png",
            )
    else:
        top1 = apd_top1_mse(method, value)
        out["top1_mse_per_feature"] = {"mean": top1.mean().item(), "max": top1.max().item()}
        out["eval_losses"] = method.training_loss(eval_x, torch.Generator())[1]
        best = top1_components(method, value)
        out["distinct_top1_components"] = len(set(best.tolist()))
        if isinstance(target, ResidualMLP):
            # the paper's per-feature losses; which neurons, in which layers, each feature's best
            # component carries
            out |= loss_scores(method)
            weights = {m: component_weights(method, m) for m in target.matrix_names}
            per_feature = torch.stack([
                layer_contributions(target, {m: w[c] for m, w in weights.items()})[i]
                for i, c in enumerate(best.tolist())
            ])  # fmt: skip
            reference = layer_contributions(target, target.matrices())
            if target.cfg.n_layers > 1:  # cross-layer: the paper's 2-layer figure
                shares = {"target": layer_shares(reference), "best_components": layer_shares(per_feature)}
                out["layer_share"] = {k: v.mean(0).tolist() for k, v in shares.items()}
                out["features_with_10pct_in_every_layer"] = {
                    k: int((v >= 0.1).all(-1).sum()) for k, v in shares.items()
                }
            if figures is not None:
                layers = " | ".join(f"layer {i}" for i in range(target.cfg.n_layers))
                fig = plot_neuron_contributions(
                    reference.flatten(1), per_feature.flatten(1),
                    f"{tag}: neuron contributions ({layers})",
                )  # fmt: skip
                save(fig, figures / f"{tag}_neurons.png")
    return out


def run_experiment(
    config: ExperimentConfig,
    runs: Path | None,
    figures: Path | None,
    progress: Literal["bar", "none"] = "bar",
    stop_at: int | None = None,
    device: str = "cpu",
    changed: str = "",
) -> dict:
    """Train target, decompose, evaluate. Returns the results dictionary (also saved).

    With `stop_at`, the decomposition stops at that step (or resumes up to it) and the partial
    result is evaluated and labelled with the steps actually trained. Training runs on `device`
    ("cpu", "cuda"); evaluation on the CPU."""
    t0 = time.time()
    seed, target_seed = config.method.seed, config.target.seed
    if runs is not None:  # run folders are outputs, never committed
        runs.mkdir(parents=True, exist_ok=True)
        (runs / ".gitignore").write_text("*\n")
    slug = config.name.replace("/", "-")
    optim = config.method.optim
    seeds = f"seed{seed}" if seed == target_seed else f"seed{target_seed}_dseed{seed}"
    name = f"{slug}_{seeds}_steps{optim.steps}_batch{optim.batch_size}{changed}"
    target_folder = target_dir(runs, config) if runs else None
    method_dir = target_folder.parent / name if target_folder else None
    target, target_loss = train_target(config, target_folder, progress, device)
    t1 = time.time()
    method, history = decompose(config, target, method_dir, progress, stop_at)
    t2 = time.time()
    method.cpu()
    trained = min(stop_at, optim.steps) if stop_at is not None else optim.steps
    if method_dir is not None:  # a checkpoint may already be past stop_at
        trained = load_checkpoint(method_dir / CHECKPOINT_NAME)["step"]
    tag = name if trained == optim.steps else f"{name}_stopped{trained}"
    results = {
        "experiment": config.name,
        "seed": target_seed,
        "decomposition_seed": seed,
        "changed_settings": changed.lstrip("_"),
        "steps": optim.steps,
        "trained_steps": trained,
        "batch_size": optim.batch_size,
        "target_loss": target_loss,
        "final_train_metrics": history[-1] if history else {},
        **evaluate(method, figures, tag),
        "wall_s": {
            "target": round(t1 - t0, 1),
            "decomposition": round(t2 - t1, 1),
            "total": round(time.time() - t0, 1),
        },
        "machine": (
            torch.cuda.get_device_name(device)
            if torch.device(device).type == "cuda"
            else f"CPU, {torch.get_num_threads()} torch thread(s)"
        ),
        "config": dataclasses.asdict(config),
    }
    if method_dir is not None:
        (method_dir / "results.json").write_text(json.dumps(results, indent=1, default=str))
    return results


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "experiment", help="tms-5-2, tms-5-2-id, tms-40-10, tms-40-10-id, resid-mlp-1, resid-mlp-2"
    )
    parser.add_argument("--method", choices=["apd", "spd"], required=True)
    commands.add_seed(parser)
    parser.add_argument(
        "--decomposition-seed",
        type=int,
        default=None,
        help="seed of the decomposition's initialisation and data (default: --seed)",
    )
    parser.add_argument(
        "--steps", type=int, default=None, help="shorten the decomposition (default: paper)"
    )
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--target-steps", type=int, default=None, help="shorten target training")
    parser.add_argument("--runs", type=Path, default=Path("runs/apd"))
    parser.add_argument("--figures", type=Path, default=Path("docs/apd_figures"))
    commands.add_threads(parser)
    parser.add_argument("--device", default="cpu", help="where to train: cpu, cuda, cuda:1, ...")
    parser.add_argument(
        "--stop-at", type=int, default=None, help="stop (or resume up to) this decomposition step"
    )
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="change a method setting, e.g. simplicity_coeff=0.5 or optim.lr=1e-2")
    args = parser.parse_args(argv)
    config = with_seed(preset(args.experiment, args.method), args.seed, args.decomposition_seed)
    if args.steps is not None or args.batch_size is not None:
        config = shortened(config, args.steps or config.method.optim.steps, args.batch_size)
    config = with_target_steps(config, args.target_steps)
    config, changed = overridden(config, args.set)
    progress = "none" if args.no_progress else "bar"
    with commands.torch_settings(threads=args.threads):
        results = run_experiment(
            config, args.runs, args.figures, progress, args.stop_at, args.device, changed
        )
    summary = {
        k: results[k] for k in results if k not in ("config", "norms", "best_component_per_feature")
    }
    print(json.dumps(summary, indent=1, default=str))
    return results


if __name__ == "__main__":
    commands.run_command("python -m tl_depass.apd.reproduce", main, (DepassError, ConfigError))
