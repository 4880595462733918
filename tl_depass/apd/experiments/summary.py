"""Collect `results.json` files from reproduction runs into one Markdown table.

python -m tl_depass.apd.experiments.summary runs/apd
"""

import argparse
import json
from pathlib import Path

__all__ = ["load_results", "markdown_table"]


def load_results(runs: Path) -> list[dict]:
    rows = [json.loads(p.read_text()) for p in sorted(runs.rglob("results.json"))]
    return sorted(
        rows,
        key=lambda r: (r["experiment"], r["steps"], r["seed"], r.get("decomposition_seed", -1)),
    )


def _pm(pair: list[float] | None, digits: int) -> str:
    return "—" if pair is None else f"{pair[0]:.{digits}f} ± {pair[1]:.{digits}f}"


def markdown_table(rows: list[dict]) -> str:
    lines = [
        "| experiment | seed | steps × batch | MMCS | ML2R | alive (norm > 0.1) "
        "| CI-L0 / top-1 MSE | target loss | wall (target + decomposition) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "ci_l0" in r:
            extra = "CI-L0 " + ", ".join(f"{k} {v:.2f}" for k, v in r["ci_l0"].items())
        else:
            extra = f"top-1 MSE {r['top1_mse_per_feature']['mean']:.2e}"
        steps = str(r["steps"])
        if r.get("trained_steps", r["steps"]) < r["steps"]:
            steps = f"{r['trained_steps']} of {r['steps']} (stopped)"
        alive = ", ".join(f"{k} {v}" for k, v in r["alive"].items())
        wall = f"{r['wall_s']['target'] / 60:.1f} + {r['wall_s']['decomposition'] / 60:.1f} min"
        changed = f" ({r['changed_settings']})" if r.get("changed_settings") else ""
        seed = str(r["seed"])
        if r.get("decomposition_seed", r["seed"]) != r["seed"]:
            seed += f" (decomposition {r['decomposition_seed']})"
        lines.append(
            f"| {r['experiment']}{changed} | {seed} | {steps} × {r['batch_size']} | "
            f"{_pm(r.get('mmcs'), 4)} | {_pm(r.get('ml2r'), 3)} | {alive} | {extra} | "
            f"{r['target_loss']:.2e} | {wall} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("runs", type=Path, nargs="?", default=Path("runs/apd"))
    table = markdown_table(load_results(parser.parse_args(argv).runs))
    print(table)
    return table


if __name__ == "__main__":
    from tl_depass import commands

    commands.run_command("python -m tl_depass.apd.experiments.summary", main)
