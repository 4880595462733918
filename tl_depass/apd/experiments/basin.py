"""Is the ground truth an optimum of APD's objective on a TMS target, and does a run stay there?

    python -m tl_depass.apd.experiments.basin tms-40-10 --seed 2 --steps 3000 \\
        docs/apd_artifacts/tms-40-10-apd_seed2.safetensors

Builds the ground-truth decomposition of the trained target (component c < n_features holds row
c of W and nothing else; the spare components start at a tenth of the recipe's random
initialisation) and prints APD's loss terms with the recipe's coefficients, averaged over fixed
batches, for: the ground truth at a few scales (APD shrinks components: the paper's ML2R for TMS
40-10 is 0.935), the decompositions in the given artefacts (same target), and a run of the recipe
started at the ground truth (scale 0.93; the first `--steps` steps of the recipe's schedule),
every `--every` steps, each with MMCS, ML2R and the number of distinct best components. A run
that stays there, below the artefacts' loss, shows a stable optimum that the runs from a random
initialisation miss.
"""

import argparse
import tempfile
from pathlib import Path

import torch

from tl_depass import commands
from tl_depass.apd.apd import APD
from tl_depass.apd.check import read_artifact
from tl_depass.apd.configs import APDConfig, ConfigError
from tl_depass.apd.experiments.presets import overridden, preset
from tl_depass.apd.metrics import component_weights, mmcs_ml2r
from tl_depass.apd.reproduce import target_dir, train_target, with_seed, with_target_steps
from tl_depass.apd.targets import TMS
from tl_depass.apd.train import train
from tl_depass.errors import DepassError

__all__ = ["at_ground_truth", "loss_terms", "main"]


def at_ground_truth(target: TMS, cfg: APDConfig, scale: float = 1.0) -> APD:
    """APD of `target` whose component c < n_features is `scale` · (row c of W) as a rank-one
    factor pair; the others keep a tenth of their initialisation. TMS without a hidden identity."""
    if not isinstance(target, TMS) or list(target.matrices()) != ["W"]:
        raise ConfigError("the ground truth is built for TMS targets without a hidden identity")
    weight = target.matrices()["W"]
    n = weight.shape[0]
    if cfg.C < n:
        raise ConfigError(f"C = {cfg.C} components cannot hold {n} features one each")
    apd = APD(target, cfg)
    with torch.no_grad():
        a, b = apd.A["W"], apd.B["W"]
        a.mul_(0.1)
        b.mul_(0.1)
        a[:n], b[:n] = 0.0, 0.0
        a[torch.arange(n), torch.arange(n), 0] = scale**0.5
        b[:n, 0] = weight * scale**0.5
    return apd


def loss_terms(apd: APD, batches: list[torch.Tensor]) -> dict[str, float]:
    """The terms of `APD.training_loss` (and the loss), averaged over `batches`."""
    runs = [apd.training_loss(x, torch.Generator())[1] for x in batches]
    return {k: sum(r[k] for r in runs) / len(runs) for k in runs[0]}


def line(label: str, apd: APD, batches: list[torch.Tensor]) -> str:
    t = loss_terms(apd, batches)
    match = mmcs_ml2r(apd.target.matrices()["W"], component_weights(apd, "W"))
    return (f"| {label} | {t['loss']:.5f} | {t['faithfulness']:.1e} | {t['minimality']:.3e} | "
            f"{t['simplicity']:.3e} | {match.cosine.mean():.4f} | {match.l2_ratio.mean():.3f} | "
            f"{len(set(match.best.tolist()))} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("experiment", help="tms-5-2 or tms-40-10 (APD preset)")
    commands.add_seed(parser)
    parser.add_argument("artifacts", nargs="*", type=Path, help="decompositions of the same target")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="change a method setting, as reproduce --set (e.g. topk=1.5)")
    parser.add_argument("--steps", type=int, default=0, help="train from the ground truth")
    parser.add_argument("--every", type=int, default=1000)
    parser.add_argument("--target-steps", type=int, default=None, help="shorten target training")
    parser.add_argument("--runs", type=Path, default=Path("runs/apd"))
    commands.add_threads(parser)
    args = parser.parse_intermixed_args(argv)
    config = with_target_steps(with_seed(preset(args.experiment, "apd"), args.seed),
                               args.target_steps)
    config, _ = overridden(config, args.set)
    cfg = config.method
    with commands.torch_settings(threads=args.threads):
        target, _ = train_target(config, target_dir(args.runs, config), "none")
        generator = torch.Generator().manual_seed(123)
        batches = [target.sample(cfg.optim.batch_size, generator) for _ in range(20)]
        print(f"{args.experiment} APD, seed {args.seed}, C {cfg.C}, m {cfg.m}, top-k {cfg.topk}, "
              f"coefficients {cfg.faithfulness_coeff} / {cfg.minimality_coeff} / "
              f"{cfg.simplicity_coeff}, p {cfg.p}")
        print("| decomposition | loss | faithfulness | minimality | simplicity | MMCS | ML2R | "
              "distinct |\n|---|---|---|---|---|---|---|---|")
        for scale in (1.0, 0.95, 0.93, 0.9):
            print(line(f"ground truth × {scale}", at_ground_truth(target, cfg, scale), batches))
        for path in args.artifacts:
            tensors, _ = read_artifact(path)
            if "W/A" not in tensors or not torch.allclose(
                    tensors["W/target"].float(), target.matrices()["W"], atol=1e-6):
                raise DepassError(f"{path}: no factors W/A, W/B of this target (--seed "
                                  f"{args.seed}); give an APD artefact of the same target")
            trained = APD(target, cfg)
            with torch.no_grad():
                trained.A["W"].copy_(tensors["W/A"])
                trained.B["W"].copy_(tensors["W/B"])
            print(line(path.name, trained, batches))
        apd = at_ground_truth(target, cfg, 0.93)
        with tempfile.TemporaryDirectory() as run_dir:
            for stop in range(args.every, args.steps + 1, args.every):
                train(apd, target.sample, cfg.optim, seed=cfg.seed + 10_000,
                      run_dir=Path(run_dir), stop_at=stop, progress="none",
                      checkpoint_every=args.every)
                print(line(f"from the ground truth, step {stop}", apd, batches), flush=True)
    return 0


if __name__ == "__main__":
    commands.run_command("python -m tl_depass.apd.experiments.basin", main,
                         (DepassError, ConfigError))
