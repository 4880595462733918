"""One training loop for targets, APD and SPD: schedule, progress bar, metrics, checkpoints.

Determinism: all randomness after construction (data, SPD masks) comes from one
`torch.Generator` on the objective's device, whose state is checkpointed with the model,
optimiser and scheduler, so an interrupted run resumed from its checkpoint (on the same device)
produces the same numbers as an uninterrupted one. A CPU and a GPU run of the same seed draw
different random streams. Ctrl-C (SIGINT) ends a run after the current step, with a checkpoint;
where SIGINT is ignored (a background job started with `nohup` or `&`), it stays ignored.

A checkpoint holds tensors and plain values only and is read with `weights_only=True`: loading a
planted or damaged file raises a DepassError and never runs its code.
"""

import json
import math
import os
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Literal, Protocol, runtime_checkable

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from tl_depass.apd.configs import OptimConfig
from tl_depass.apd.targets import ToyTarget
from tl_depass.engine.files import read_checkpoint, require_keys
from tl_depass.errors import DepassError

__all__ = ["Objective", "TargetObjective", "train", "lr_factor", "load_checkpoint", "CHECKPOINT_NAME"]

CHECKPOINT_NAME = "checkpoint.pt"
CHECKPOINT_KEYS = ("objective", "optimizer", "scheduler", "generator", "step", "history")


@runtime_checkable
class Objective(Protocol):
    """What `train` optimises: an nn.Module with a loss on a batch."""

    def parameters(self): ...

    def state_dict(self): ...

    def load_state_dict(self, state: dict): ...

    def training_loss(
        self, x: Tensor, generator: torch.Generator
    ) -> tuple[Tensor, dict[str, float]]: ...

    def before_optimizer_step(self) -> None: ...


class TargetObjective(nn.Module):
    """Trains a toy target on its labels with MSE (TMS: importance 1 everywhere)."""

    def __init__(self, target: ToyTarget):
        super().__init__()
        self.target = target

    def training_loss(
        self, x: Tensor, generator: torch.Generator
    ) -> tuple[Tensor, dict[str, float]]:
        loss = (self.target(x) - self.target.labels(x)).pow(2).mean()
        return loss, {"loss": loss.item()}

    def before_optimizer_step(self) -> None:
        pass


def lr_factor(step: int, cfg: OptimConfig) -> float:
    """Linear warmup over `warmup_frac · steps`, then constant, cosine or linear decay to 0."""
    warmup = int(cfg.warmup_frac * cfg.steps)
    if step < warmup:
        return (step + 1) / warmup
    if cfg.schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, cfg.steps - warmup)
    if cfg.schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0 - progress


def _optimizer(params: list[nn.Parameter], cfg: OptimConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def load_checkpoint(path: Path, map_location: torch.device | str = "cpu") -> dict:
    """A checkpoint written by `train`, read without running code (`weights_only=True`)."""
    state = read_checkpoint(path, map_location)
    require_keys(state, CHECKPOINT_KEYS, path, "checkpoint")
    if not (isinstance(state["step"], int) and isinstance(state["history"], list)):
        raise DepassError(f"checkpoint {path}: 'step' must be an int and 'history' a list; it was "
                          "not written by tl_depass: delete it or use another run folder")
    return state


def _atomic_save(state: dict, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


@contextmanager
def _interrupt_at_step_end() -> Iterator[list[bool]]:
    """While training, Ctrl-C (SIGINT) only appends to the yielded flag, which the loop reads
    once the current step is done, so the checkpoint then written resumes exactly. Outside the
    main thread no handler can be set and SIGINT keeps its usual effect; where it is ignored (a
    background job), it stays ignored."""
    flag: list[bool] = []
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is signal.SIG_IGN):
        yield flag
        return
    previous = signal.signal(signal.SIGINT, lambda *_: flag.append(True))
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


def _settings(objective: nn.Module) -> dict:
    """The objective's own configuration (APD, SPD), checked when a checkpoint is resumed."""
    cfg = getattr(objective, "cfg", None)
    return asdict(cfg) if is_dataclass(cfg) else {}


def train(
    objective: Objective,
    sample: Callable[[int, torch.Generator], Tensor],
    cfg: OptimConfig,
    seed: int,
    run_dir: Path | None,
    *,
    log_every: int = 100,
    checkpoint_every: int = 1000,
    stop_at: int | None = None,
    progress: Literal["bar", "none"] = "bar",
    description: str = "train",
) -> list[dict[str, float | int]]:
    """Train `objective` for `cfg.steps` steps; returns the metric history.

    With a `run_dir`, a checkpoint is written every `checkpoint_every` steps and at the end, and
    an existing checkpoint there is resumed from. `stop_at` ends the call early at that step (to
    split a run over several calls); None runs to the end. Metrics also go to `metrics.jsonl`.
    """
    if log_every < 1 or checkpoint_every < 1:
        raise ValueError(
            f"log_every and checkpoint_every must be >= 1, got {log_every}, {checkpoint_every}."
        )
    params = [p for p in objective.parameters() if p.requires_grad]
    if not params:
        raise ValueError("The objective has no trainable parameters.")
    optimizer = _optimizer(params, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
    generator = torch.Generator(device=params[0].device).manual_seed(seed)
    step, history, moved = 0, [], False
    checkpoint = run_dir / CHECKPOINT_NAME if run_dir is not None else None
    if checkpoint is not None and checkpoint.exists():
        state = load_checkpoint(checkpoint, generator.device)
        if state.get("optim", asdict(cfg)) != asdict(cfg):
            raise DepassError(
                f"{checkpoint} was written by a run with {state['optim']}, not {asdict(cfg)}: "
                "use another run folder, or the settings it was written with."
            )
        settings, written = _settings(objective), state.get("settings")
        if written is None and settings:  # written before checkpoints recorded them (30 Nov)
            raise DepassError(
                f"{checkpoint} does not record the settings it was written with, so this run's "
                "cannot be checked against them (the TMS APD presets' initialisation changed on "
                "30 Nov, for one): use another run folder, or delete this one."
            )
        written = settings if written is None else written
        if written != settings:
            changed = sorted(k for k in written | settings if written.get(k) != settings.get(k))
            raise DepassError(
                f"{checkpoint} was written by a run with other settings "
                f"({', '.join(f'{k}={written.get(k)!r}' for k in changed)}; now "
                f"{', '.join(f'{k}={settings.get(k)!r}' for k in changed)}): use another run "
                "folder, or the settings it was written with."
            )
        written_on = state.get("device", "cpu")
        moved = written_on != generator.device.type  # loads only where no step is left to train
        if moved and state["step"] < (cfg.steps if stop_at is None else min(stop_at, cfg.steps)):
            raise DepassError(
                f"{checkpoint} was written on {written_on} and cannot resume exactly on "
                f"{generator.device.type} (different random streams): resume it on {written_on}, "
                "or use another run folder (a finished checkpoint, or one at or past stop_at, "
                "loads on any device)."
            )
        try:
            objective.load_state_dict(state["objective"])
            if not moved:
                optimizer.load_state_dict(state["optimizer"])
                scheduler.load_state_dict(state["scheduler"])
                generator.set_state(state["generator"].cpu())  # a CPU ByteTensor, also for CUDA
        except (RuntimeError, ValueError, KeyError, TypeError) as e:
            raise DepassError(f"{checkpoint} does not fit this model ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else e!r}): it was written by "
                              "another configuration; use another run folder") from None
        step, history = state["step"], state["history"]

    def save() -> None:
        if checkpoint is None:
            return
        checkpoint.parent.mkdir(parents=True, exist_ok=True)
        _atomic_save(
            {
                "objective": objective.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "generator": generator.get_state(),
                "step": step,
                "history": history,
                "device": generator.device.type,
                "optim": asdict(cfg),
                "settings": _settings(objective),
            },
            checkpoint,
        )
        with open(checkpoint.parent / "metrics.jsonl", "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in history)

    end = cfg.steps if stop_at is None else min(stop_at, cfg.steps)
    bar = tqdm(
        total=cfg.steps, initial=step, desc=description, disable=progress == "none", mininterval=2.0
    )
    with _interrupt_at_step_end() as interrupted:
        while step < end:
            x = sample(cfg.batch_size, generator)
            loss, metrics = objective.training_loss(x, generator)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            objective.before_optimizer_step()
            optimizer.step()
            scheduler.step()
            step += 1
            if step % log_every == 0 or step == cfg.steps:
                row = {"step": step, "lr": scheduler.get_last_lr()[0], **metrics}
                history.append(row)
                bar.set_postfix(loss=f"{metrics.get('loss', loss.item()):.3g}")
            if step % checkpoint_every == 0:
                save()
            bar.update(1)
            if interrupted:
                break
    bar.close()
    if not moved:  # a checkpoint from another device stays as it was written
        save()
    if interrupted:
        where = f"; checkpoint in {run_dir}, rerun to resume" if run_dir else ""
        raise KeyboardInterrupt(f"{description}: interrupted after step {step}{where}.")
    return history
