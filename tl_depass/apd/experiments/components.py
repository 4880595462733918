"""What each component holds, read from an artefact (docs/apd_artifacts/*.safetensors):

    python -m tl_depass.apd.experiments.components docs/apd_artifacts/tms-5-2-apd_seed0.safetensors

For the feature site (TMS: `W`, rows = features), per component: its norm, and for each feature
row j the row's norm relative to the target's row j and its cosine with it. A component "for"
feature j has row j near norm ratio 1 and cosine 1 and the other rows near 0.
"""

import argparse
from pathlib import Path

import torch

from tl_depass import commands
from tl_depass.apd.check import read_artifact, site_components

__all__ = ["feature_table", "main"]


@torch.no_grad()
def feature_table(path: Path) -> str:
    tensors, meta = read_artifact(path)
    site = meta.get("feature_site", "")
    if not site:
        return f"{path.name}: no feature site (not a TMS artefact)"
    target, comps = site_components(tensors, path)[site]
    ratio = comps.norm(dim=-1) / target.norm(dim=-1)  # [C, n_features]
    cos = torch.einsum("cjh,jh->cj", comps, target) / (
        comps.norm(dim=-1) * target.norm(dim=-1) + 1e-12
    )
    order = comps.flatten(1).norm(dim=-1).argsort(descending=True).tolist()
    n = target.shape[0]
    lines = [f"{path.name}: site {site!r}, cells 'norm ratio / cosine' per feature row"]
    lines.append("| component | norm | " + " | ".join(f"f{j}" for j in range(n)) + " |")
    lines.append("|---" * (n + 2) + "|")
    for c in order:
        cells = [
            f"**{ratio[c, j]:.2f} / {cos[c, j]:.3f}**" if ratio[c, j] > 0.3
            else f"{ratio[c, j]:.2f} / {cos[c, j]:+.2f}"
            for j in range(n)
        ]
        lines.append(f"| {c} | {comps[c].norm():.3f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("files", nargs="+", type=Path)
    for path in parser.parse_args(argv).files:
        print(feature_table(path))
    return 0


if __name__ == "__main__":
    commands.run_command("python -m tl_depass.apd.experiments.components", main)
