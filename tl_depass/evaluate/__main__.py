"""`python -m tl_depass.evaluate --all`: every protocol on every bundled model and its task;
writes docs/results.md (+ figures) and prints the tables. A task model gets its task's prompts
(`tl_depass.models.tasks.generate`), the real-text model `pystdlib` real code completions from
its held-out files (`tl_depass.evaluate.completions`, the natural-text protocol).

    python -m tl_depass.evaluate --all
    python -m tl_depass.evaluate --models ioi --n 32 --out /tmp/results.md
    python -m tl_depass.evaluate --models pystdlib --n 32 --out /tmp/results.md
"""

import argparse
import os
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
# The real-text model's neurons are left out: DePass over its 512 neurons per layer on prompts of
# 32 tokens costs about 2 s per prompt, layer and rule on a shared 2-core machine (about 35 minutes
# for 256 prompts); its tokens and heads go through every method.
TEXT_NEURON_LAYERS: list[int] = []


def parser() -> argparse.ArgumentParser:
    from tl_depass import commands

    p = argparse.ArgumentParser(prog="python -m tl_depass.evaluate", description=(
        "Faithfulness protocols (token deletion, head/neuron ablation, agreement with exact "
        "patching) for DePass and the baselines on the bundled models."))
    p.add_argument("--all", action="store_true", help="every bundled model and its task")
    p.add_argument("--models", nargs="+", help="bundled model names (default with --all: all of "
                   "them, the task models and the real-text one)")
    p.add_argument("--n", type=int, default=256, help="prompts per task (default: %(default)s)")
    commands.add_seed(p, "task and random-method seed (default: %(default)s)")
    commands.add_threads(p, "torch threads (default: %(default)s; the models are tiny, and one "
                         "thread is faster than two busy ones)")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "results.md",
                   help="the Markdown file to write; figures go to <its folder>/results_figures")
    return p


def conditions(args, seconds: float, names: list[str]) -> str:
    import transformer_lens

    from tl_depass import models

    try:
        tl_version = transformer_lens.__version__
    except AttributeError:
        from importlib.metadata import version

        tl_version = version("transformer_lens")
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    load = f"{os.getloadavg()[2]:.1f}" if hasattr(os, "getloadavg") else "unknown"
    text = [n for n in names if n in models.names("text")]
    prompts = (f"`tl_depass.models.tasks.generate(task, {args.n}, seed={args.seed})`"
               if len(text) < len(names) else "")
    if text:
        real = (f"`tl_depass.evaluate.completions.make(model, {args.n}, seed={args.seed})`, real code "
                f"completions, for {', '.join(text)}")
        prompts = f"{prompts}; {real}" if prompts else real
    return (f"Run {when}: models {', '.join(names)}; {args.n} prompts per task "
            f"({prompts}), float32. "
            f"Wall time {seconds:.0f} s in all on {platform.machine()} "
            f"({os.cpu_count()} CPU cores visible, torch threads {torch.get_num_threads()}, "
            f"load average {load} over the last 15 minutes at the end: other jobs shared the "
            f"machine when it is above the threads used), Python {platform.python_version()}, "
            f"torch {torch.__version__}, TransformerLens {tl_version}.")


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if not args.all and not args.models:
        parser().print_help()
        return 2
    import pandas as pd

    from tl_depass import models
    from tl_depass.evaluate import completions
    from tl_depass.evaluate import summary as report
    from tl_depass.evaluate.run import evaluate
    from tl_depass.models import tasks

    torch.set_num_threads(args.threads)
    names = args.models or models.names("all")
    if not names:
        raise SystemExit("no bundled models found: train them with `python -m tl_depass.models.train`")
    start = time.perf_counter()
    results, describe = [], {}
    for name in names:
        model = models.load(name)
        describe[name] = models.describe(name)
        layers = None  # every MLP layer
        if name in models.names("text"):
            batch = completions.make(model, args.n, seed=args.seed, name=name)
            layers = TEXT_NEURON_LAYERS
            describe[name] += ("\n\n" + completions.describe(batch, seed=args.seed) + " Tokens and "
                               "heads only: the neuron protocols are not run on this model (cost).")
        else:
            batch = tasks.generate(models.info(name)["task"], args.n, seed=args.seed)
        print(f"{name}: {describe[name]}", flush=True)
        results.append(evaluate(model, batch, name, neuron_layers=layers, seed=args.seed))
    seconds = time.perf_counter() - start
    folder = args.out.parent / "results_figures"
    text = report.markdown(results, conditions(args, seconds, names), describe, folder,
                           "results_figures")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(report.headline(results).to_string(index=False))
    print(f"\nwrote {args.out} and {folder}/ in {seconds:.0f} s")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
