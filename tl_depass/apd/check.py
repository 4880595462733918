"""Recompute a decomposition artefact's headline numbers from the file alone:

    python -m tl_depass.apd.check docs/apd_artifacts/tms-40-10-ref-apd_seed0.safetensors

Prints, per site, the alive components (Frobenius norm > 0.1) and the faithfulness
`‖Σ_c P_c − W‖_F` (also relative to `‖W‖_F`), and at the feature site MMCS and ML2R (mean ± std
over features, as in docs/apd_results.md). For a residual-MLP APD it rebuilds the target and the
decomposition from the file (float64) and runs them: the distinct top-1 components on one-hot
inputs and the per-feature losses of `metrics.feature_losses` (the top-k loss over the target's,
the features within 10%). The numbers recorded in the file at export are
printed beside them; a file that cannot be read, does not follow the layout (see
`tl_depass.apd.export`), or whose numbers differ from those it records, exits with status 1 and
says what is wrong. `--json` prints the recomputed numbers as JSON.
"""

import argparse
import json
import math
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from jaxtyping import Float, Shaped
from safetensors import SafetensorError, safe_open
from torch import Tensor

from tl_depass import commands
from tl_depass.apd.apd import APD
from tl_depass.apd.configs import APDConfig, OptimConfig, ResidualMLPConfig
from tl_depass.apd.metrics import (
    ALIVE_THRESHOLD,
    RESIDUAL_ONE_HOT,
    alive,
    loss_scores,
    mmcs_ml2r,
    top1_components,
)
from tl_depass.apd.targets import make_target
from tl_depass.engine.files import read_safetensors
from tl_depass.errors import DepassError

__all__ = [
    "ALIVE_THRESHOLD", "read_artifact", "site_components", "unpacked", "residual_mlp_apd",
    "headline_metrics", "main",
]

_SITE_KEY = re.compile(r"^(?P<site>.+)/(?P<part>target|components|A|B|A_packed|B_packed|ranks)$")


def read_artifact(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The tensors and metadata of an artefact; DepassError if it is not one."""
    tensors = read_safetensors(path, "artefact")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise DepassError(f"artefact {path}: cannot read its metadata ({e})") from None
    if "format" not in meta:
        raise DepassError(f"artefact {path} has no 'format' metadata: it was not written by "
                          "tl_depass.apd.export (write it with python -m tl_depass.apd.export)")
    sites = site_components(tensors, path)  # validates the layout
    if meta.get("feature_site", "") and meta["feature_site"] not in sites:
        raise DepassError(f"artefact {path}: its feature site {meta['feature_site']!r} is not "
                          f"among its sites {sorted(sites)}; export it again")
    return tensors, meta


def site_components(
    tensors: dict[str, Tensor], path: Path | str = "<tensors>"
) -> dict[str, tuple[Float[Tensor, "d_in d_out"], Float[Tensor, "C d_in d_out"]]]:
    """Per site, (target matrix, component matrices) in float64, after checking the layout."""
    parts: dict[str, dict[str, Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("target/"):
            continue
        found = _SITE_KEY.match(key)
        if found is None:
            raise DepassError(f"artefact {path}: unexpected tensor {key!r}; names are "
                              "<site>/target, <site>/components, <site>/A, <site>/B, "
                              "<site>/A_packed, <site>/B_packed, <site>/ranks or target/<name>")
        parts.setdefault(found["site"], {})[found["part"]] = value.double()
    if not parts:
        raise DepassError(f"artefact {path} holds no <site>/target tensor: nothing to check")
    out, n_components = {}, set()
    for site, p in parts.items():
        if "target" not in p:
            raise DepassError(f"artefact {path}: site {site!r} lacks {site}/target [d_in, d_out]")
        target = p["target"]
        if target.ndim != 2:
            raise DepassError(f"artefact {path}: {site}/target has shape {tuple(target.shape)}, "
                              "not [d_in, d_out]")
        d_in, d_out = target.shape
        if "components" in p:
            comps = p["components"]
        elif "A" in p and "B" in p:
            a, b = p["A"], p["B"]
            if a.ndim != 3 or b.ndim != 3 or a.shape[0] != b.shape[0] or a.shape[2] != b.shape[1]:
                raise DepassError(f"artefact {path}: {site}/A {tuple(a.shape)} and {site}/B "
                                  f"{tuple(b.shape)} are not [C, d_in, m] and [C, m, d_out]")
            comps = a @ b
        elif {"A_packed", "B_packed", "ranks"} <= p.keys():
            a, b, ranks = p["A_packed"], p["B_packed"], p["ranks"]
            if (a.ndim, b.ndim, ranks.ndim) != (2, 2, 1) or len(a) != len(b):
                raise DepassError(f"artefact {path}: {site}/A_packed {tuple(a.shape)}, "
                                  f"{site}/B_packed {tuple(b.shape)} and {site}/ranks "
                                  f"{tuple(ranks.shape)} are not [R, d_in], [R, d_out] and [C]")
            a, b = unpacked(a, b, ranks, f"artefact {path}: {site}")
            comps = a @ b
        else:
            raise DepassError(f"artefact {path}: site {site!r} needs {site}/components, both "
                              f"{site}/A and {site}/B, or {site}/A_packed, {site}/B_packed and "
                              f"{site}/ranks")
        if comps.ndim != 3 or tuple(comps.shape[1:]) != (d_in, d_out):
            raise DepassError(f"artefact {path}: the components of {site!r} have shape "
                              f"{tuple(comps.shape)}, not [C, {d_in}, {d_out}] as its target")
        if not (torch.isfinite(comps).all() and torch.isfinite(target).all()):
            raise DepassError(f"artefact {path}: site {site!r} holds NaN or infinite values")
        n_components.add(comps.shape[0])
        out[site] = (target, comps)
    if len(n_components) > 1:
        raise DepassError(f"artefact {path}: sites have different numbers of components "
                          f"{sorted(n_components)}; every site needs the same C")
    return out


def unpacked(
    a_rows: Float[Tensor, "R d_in"], b_rows: Float[Tensor, "R d_out"], ranks: Shaped[Tensor, " C"],
    where: str = "packed factors",
) -> tuple[Float[Tensor, "C d_in m"], Float[Tensor, "C m d_out"]]:
    """The factors `A`, `B` of the packed layout, zero-padded to m = the largest rank: component
    c has the next `ranks[c]` rows (component 0's first), row k giving `A[c][:, j] = a_rows[k]`,
    `B[c][j] = b_rows[k]`."""
    counts = ranks.round().long()
    if (counts != ranks).any() or (counts < 0).any() or int(counts.sum()) != len(a_rows):
        raise DepassError(f"{where}: ranks must be non-negative integers summing to the "
                          f"{len(a_rows)} packed rows, got {ranks.tolist()}")
    owner = torch.repeat_interleave(torch.arange(len(counts)), counts)
    slot = torch.arange(len(owner)) - (counts.cumsum(0) - counts)[owner]
    m = max(int(counts.max()), 1) if len(counts) else 1
    first = a_rows.new_zeros(len(counts), m, a_rows.shape[1])
    second = b_rows.new_zeros(len(counts), m, b_rows.shape[1])
    first[owner, slot], second[owner, slot] = a_rows, b_rows
    return first.transpose(1, 2), second


def residual_mlp_apd(tensors: dict[str, Tensor], meta: Mapping[str, str]) -> APD:
    """The residual-MLP APD decomposition that a file describes, in the default dtype: the target
    built from the metadata's "target" config and loaded with the file's weights, each site's
    components as the factors (P_c, I) or (I, P_c), whichever is narrower (the attributions do
    not depend on how a component is factored)."""
    sites = site_components(tensors)
    try:
        target_cfg, method_cfg = json.loads(meta["target"]), json.loads(meta["method_config"])
        target = make_target(ResidualMLPConfig(**target_cfg | {
            "train": OptimConfig(**target_cfg["train"])}))
        cfg = APDConfig(**method_cfg | {"optim": OptimConfig(**method_cfg["optim"]), "m": None})
    except (KeyError, TypeError, ValueError) as e:
        raise DepassError(f"the metadata's 'target' or 'method_config' does not describe a "
                          f"residual-MLP APD ({e!r}): export the run again") from None
    state = {k[7:].replace(".", "__"): v for k, v in tensors.items() if k.startswith("target/")}
    try:
        target.load_state_dict(state | {s.replace(".", "__"): w for s, (w, _) in sites.items()})
    except RuntimeError as e:
        raise DepassError(f"the file's weights do not fit the target its metadata describes: "
                          f"{str(e).splitlines()[0]} {str(e).splitlines()[-1].strip()}") from None
    apd = APD(target, cfg)
    with torch.no_grad():
        for site, (weight, comps) in sites.items():
            d_in, d_out = weight.shape
            eye = torch.eye(min(d_in, d_out), dtype=comps.dtype).expand(len(comps), -1, -1)
            first, second = (comps, eye) if d_out <= d_in else (eye, comps)
            apd.A[apd._key(site)].copy_(first)
            apd.B[apd._key(site)].copy_(second)
    return apd


def headline_metrics(
    tensors: dict[str, Tensor], feature_site: str = "", meta: Mapping[str, str] | None = None
) -> dict:
    """MMCS / ML2R at `feature_site` (if any), and per site alive count and faithfulness; for a
    residual-MLP APD (`meta` of its file) also the distinct top-1 components on one-hot inputs and
    the per-feature losses, from running the decomposition."""
    sites = site_components(tensors)
    out: dict = {"alive": {}, "faithfulness": {}, "faithfulness_relative": {}}
    for site, (target, comps) in sites.items():
        out["alive"][site] = alive(comps)
        residual = (comps.sum(0) - target).norm().item()
        out["faithfulness"][site] = residual
        out["faithfulness_relative"][site] = residual / max(target.norm().item(), 1e-30)
    if feature_site:
        if feature_site not in sites:
            raise DepassError(f"the feature site {feature_site!r} is not among the sites "
                              f"{sorted(sites)}")
        target, comps = sites[feature_site]
        match = mmcs_ml2r(target, comps)
        out["mmcs"], out["ml2r"] = list(match.mmcs), list(match.ml2r)
    if meta and meta.get("method") == "apd" and "d_embed" in json.loads(meta.get("target", "{}")):
        default = torch.get_default_dtype()
        torch.set_default_dtype(torch.float64)  # the target's data stream too
        try:
            apd = residual_mlp_apd(tensors, meta)
            best = top1_components(apd, RESIDUAL_ONE_HOT)
            out["distinct_top1_components"] = len(set(best.tolist()))
            out |= loss_scores(apd)
        finally:
            torch.set_default_dtype(default)
    return out


def _differences(recomputed: dict, recorded: dict, tol: float, prefix: str = "") -> list[str]:
    out = []
    for key, want in recorded.items():
        got = recomputed.get(key)
        name = f"{prefix}{key}"
        if isinstance(want, dict) and isinstance(got, dict):
            out += _differences(got, want, tol, f"{name}.")
        elif isinstance(want, list) and isinstance(got, list) and len(want) == len(got):
            out += [f"{name}: {g} vs {w}" for g, w in zip(got, want, strict=True)
                    if not math.isclose(g, w, rel_tol=tol, abs_tol=tol)]
        elif isinstance(want, int | float) and isinstance(got, int | float):
            if not math.isclose(got, want, rel_tol=tol, abs_tol=tol):
                out.append(f"{name}: {got} vs {want}")
        else:
            out.append(f"{name}: {got!r} vs {want!r}")
    return out


def _report(path: Path, meta: dict[str, str], metrics: dict) -> str:
    seed = meta.get("seed", "?")
    if meta.get("decomposition_seed", seed) != seed:
        seed += f" (decomposition seed {meta['decomposition_seed']})"
    changed = f", changed: {meta['changed_settings']}" if meta.get("changed_settings") else ""
    lines = [f"{path.name}: {meta.get('experiment', '?')} seed {seed}, "
             f"{meta.get('trained_steps', '?')} steps x batch {meta.get('batch_size', '?')}{changed}"]
    if "mmcs" in metrics:
        lines.append(f"  MMCS {metrics['mmcs'][0]:.4f} ± {metrics['mmcs'][1]:.4f}   "
                     f"ML2R {metrics['ml2r'][0]:.3f} ± {metrics['ml2r'][1]:.3f}   "
                     f"(site {meta['feature_site']!r})")
    if "distinct_top1_components" in metrics:
        lines.append(f"  distinct top-1 components on one-hot inputs (x = {RESIDUAL_ONE_HOT}): "
                     f"{metrics['distinct_top1_components']} for "
                     f"{len(metrics['feature_losses']['target'])} features; top-k loss / "
                     f"target's {metrics['topk_loss_over_target']:.4f} "
                     f"({metrics['features_topk_within_10pct']} features within 10%)")
    for site in metrics["alive"]:
        lines.append(f"  {site}: alive {metrics['alive'][site]} (norm > {ALIVE_THRESHOLD}), "
                     f"faithfulness ‖Σ P_c − W‖ = {metrics['faithfulness'][site]:.3e} "
                     f"({metrics['faithfulness_relative'][site]:.2e} of ‖W‖)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("files", nargs="+", type=Path, help="artefacts (.safetensors)")
    parser.add_argument("--json", action="store_true", help="print the numbers as JSON")
    args = parser.parse_args(argv)
    everything = {}
    for path in args.files:
        tensors, meta = read_artifact(path)
        metrics = headline_metrics(tensors, meta.get("feature_site", ""), meta)
        everything[str(path)] = metrics
        if not args.json:
            print(_report(path, meta, metrics))
        if "metrics" in meta:
            try:
                recorded = json.loads(meta["metrics"])
            except ValueError:
                raise DepassError(f"artefact {path}: its 'metrics' metadata is not JSON; "
                                  "export it again") from None
            differences = _differences(metrics, recorded, 1e-6)
            if differences:
                raise DepassError(f"artefact {path} does not reproduce the numbers it records "
                                  f"({'; '.join(differences[:5])}): it was modified after export")
            if not args.json:
                print("  = the numbers recorded at export")
    if args.json:
        print(json.dumps(everything, indent=1))
    return 0


if __name__ == "__main__":
    commands.run_command("python -m tl_depass.apd.check", main)
