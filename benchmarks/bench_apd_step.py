"""APD training-step speed on a residual-MLP preset (resid-mlp-1: batch 2048, C 130, d_embed 1000,
100 features; resid-mlp-2: two layers of 25 neurons, C 200).

    python benchmarks/bench_apd_step.py [--experiment resid-mlp-2] [--rounds 3]

For torch threads 1 and 2 it prints the time of one training step (loss, backward, gradient
projection, Adam step, as `tl_depass.apd.train` runs it) of the reference (the APD step before
issue 18, kept in tests/apd/test_apd.py), of the same step with the attributions every target
but the residual MLP takes (per-sample output Jacobians contracted with the component outputs,
"jacobian") and of `tl_depass.apd.APD` ("new"), each the minimum over
interleaved rounds, in process CPU time and in wall time; the new step's parts; the GEMM FLOPs
of each step (torch's FlopCounterMode: mm, bmm, addmm, baddbmm, forward and backward; elementwise
work is not counted); and the achieved rate, per CPU second and per wall second, next to the
same rates of a plain `torch.mm` of the step's largest GEMM (`[2048, 1000] @ [1000, C·m]`, the
inner products at `W_in`)
measured in the same rounds: the machine's matmul rate. On a shared machine the CPU-second rates
are the steadier ones; wall time counts the time other processes held the cores.
"""

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode, flop_registry

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "apd"))

from test_apd import reference_training_loss  # noqa: E402  (the pre-issue-18 step)

from tl_depass.apd import APD, make_target, preset  # noqa: E402

aten = torch.ops.aten


def _as_raw(formula: Callable) -> Callable:
    """A registered (already shape-wrapped) formula that FlopCounterMode must not wrap again."""

    def raw(*args, **kwargs):
        return formula(*args, **kwargs)

    raw._get_raw = True
    return raw


# FlopCounterMode knows addmm and baddbmm; the new step also uses their in-place forms.
IN_PLACE = {
    aten.addmm_: _as_raw(flop_registry[aten.addmm]),
    aten.baddbmm_: _as_raw(flop_registry[aten.baddbmm]),
}


def timed(fn: Callable[[], object]) -> tuple[float, float]:
    """(process CPU seconds, wall seconds) of one call."""
    cpu, wall = time.process_time(), time.perf_counter()
    fn()
    return time.process_time() - cpu, time.perf_counter() - wall


class Stepper:
    """One APD with its own Adam: `step()` is one training step of the given loss."""

    def __init__(self, experiment: str, loss_fn: Callable, x: torch.Tensor):
        config = preset(experiment, "apd")
        self.apd = APD(make_target(config.target), config.method)
        self.optimizer = torch.optim.Adam(self.apd.parameters(), lr=1e-3)
        self.loss_fn, self.x = loss_fn, x

    def loss(self) -> torch.Tensor:
        return self.loss_fn(self.apd, self.x)[0]

    def step(self) -> None:
        loss = self.loss()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.apd.before_optimizer_step()
        self.optimizer.step()


@torch.no_grad()
def jacobian_attributions(apd: APD, x: torch.Tensor) -> torch.Tensor:
    """The gradient attributions through per-sample output Jacobians (`APD`'s path for targets
    other than the residual MLP, and its path for the residual MLP too until 1 Dec)."""
    total = apd.jacobian_contraction(x)
    return torch.linalg.vector_norm(total, dim=-1) / total.shape[-1] ** 0.5


def jacobian_training_loss(apd: APD, x: torch.Tensor):
    apd.attributions = lambda x: jacobian_attributions(apd, x)  # this instance only
    return apd.training_loss(x, torch.Generator())


def gemm_flops(fn: Callable[[], object]) -> float:
    with FlopCounterMode(display=False, custom_mapping=IN_PLACE) as counter:
        fn()
    return counter.get_total_flops()


def new_step_parts(stepper: Stepper) -> dict[str, tuple[float, float]]:
    """The new step split into its parts, each (CPU s, wall s)."""
    apd, x = stepper.apd, stepper.x
    parts = {"attributions": timed(lambda: apd.attributions(x))}
    # the rest of the loss: target run, top-k, masked forward, losses (attributions again inside)
    cpu, wall = timed(stepper.loss)
    parts["loss without attributions"] = (cpu - parts["attributions"][0], wall - parts["attributions"][1])
    loss = stepper.loss()
    stepper.optimizer.zero_grad(set_to_none=True)
    parts["backward"] = timed(loss.backward)
    parts["projection + Adam"] = timed(lambda: (apd.before_optimizer_step(), stepper.optimizer.step()))
    return parts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", choices=["resid-mlp-1", "resid-mlp-2"], default="resid-mlp-1")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    config = preset(args.experiment, "apd")
    x = make_target(config.target).sample(config.method.optim.batch_size, torch.Generator().manual_seed(0))
    steppers = {
        "reference": Stepper(args.experiment, lambda apd, x: reference_training_loss(apd, x), x),
        "jacobian": Stepper(args.experiment, jacobian_training_loss, x),
        "new": Stepper(args.experiment, lambda apd, x: apd.training_loss(x, torch.Generator()), x),
    }
    C, _, m = steppers["new"].apd.factors(steppers["new"].apd.target.sites[0])[0].shape  # W_in
    width = C * m
    a, b = torch.randn(2048, 1000), torch.randn(1000, width)
    mm_flops = 2 * 2048 * 1000 * width
    flops = {name: gemm_flops(s.step) for name, s in steppers.items()}  # also a warm-up step
    print(f"{args.experiment} APD step, batch {x.shape[0]}, C {config.method.C}, float32, "
          f"torch {torch.__version__}")
    for name, f in flops.items():
        print(f"GEMM FLOPs per step, {name}: {f / 1e9:.1f} GFLOP")
    print()
    print(
        "| threads | step | CPU s (min) | wall s (min) | GFLOP per CPU s | GFLOP/s wall "
        "| torch.mm: GFLOP per CPU s | torch.mm: GFLOP/s wall |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for threads in (1, 2):
        torch.set_num_threads(threads)
        times: dict[str, list[tuple[float, float]]] = {"mm": [], **{n: [] for n in steppers}}
        for _ in range(args.rounds):  # interleaved, so that load from others hits both alike
            times["mm"].append(timed(lambda: a @ b))
            for name, stepper in steppers.items():
                times[name].append(timed(stepper.step))
        mm_cpu, mm_wall = min(c for c, _ in times["mm"]), min(w for _, w in times["mm"])
        for name in steppers:
            cpu, wall = min(c for c, _ in times[name]), min(w for _, w in times[name])
            print(
                f"| {threads} | {name} | {cpu:.3f} | {wall:.3f} | {flops[name] / cpu / 1e9:.0f} "
                f"| {flops[name] / wall / 1e9:.0f} | {mm_flops / mm_cpu / 1e9:.0f} "
                f"| {mm_flops / mm_wall / 1e9:.0f} |"
            )
        parts = [new_step_parts(steppers["new"]) for _ in range(args.rounds)]
        summary = ", ".join(
            f"{k} {min(p[k][0] for p in parts):.3f} / {min(p[k][1] for p in parts):.3f}" for k in parts[0]
        )
        print(f"|  | new step parts, CPU / wall s (min): {summary} | | | | | | |")


if __name__ == "__main__":
    main()
