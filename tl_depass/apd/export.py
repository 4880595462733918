"""A decomposition run as one small, self-describing safetensors file that anyone can check:

    python -m tl_depass.apd.export runs/apd/tms-5-2/tms-5-2-apd_seed1_steps20000_batch2048
    python -m tl_depass.apd.check docs/apd_artifacts/tms-5-2-apd_seed1.safetensors

Layout (also written into the file's metadata under "layout"; `x @ W` convention throughout, a
"site" is one decomposed matrix, named as in the target, e.g. "W" or "layers.0.W_in"):

    <site>/target   [d_in, d_out]   the target's matrix
    <site>/A        [C, d_in, m]    first factor of each component (APD: A; SPD: Vᵀ, m = 1)
    <site>/B        [C, m, d_out]   second factor; component c at this site is A[c] @ B[c]
    target/<name>                   the target's other weights and buffers (biases, W_E, ...)

A reader may also accept `<site>/components` [C, d_in, d_out] instead of the factors (check
does). With `--rank-tol TOL` each component is stored at its numerical rank, packed: an SVD per
component keeps the singular values above TOL times the site's largest (so dead components keep
none), and the factors' kept columns are stored without padding:

    <site>/A_packed [R, d_in]       one row σ·u per kept singular value, component 0's first
    <site>/B_packed [R, d_out]      the matching v; component c is Σ over its rows A_packedᵀ B_packed
    <site>/ranks    [C] (int32)     how many rows each component has (R in all)

What was dropped is recorded under the metadata key "reduced_rank", with the full-rank metrics
beside it. For a residual-MLP APD, "metrics" also holds what `check` recomputes by running the
decomposition that the file describes (distinct top-1 components, the per-feature losses).

Metadata (all strings, JSON where structured): "format", "layout", "experiment", "method",
"seed", "steps", "batch_size", "trained_steps", "target" (the target's config), "method_config",
"feature_site" (the site whose rows are the features, for MMCS/ML2R; "" if none), "metrics"
(what `check` recomputes, as computed at export from the stored tensors), "reduced_rank".
"""

import argparse
import dataclasses
import json
from pathlib import Path

import torch
from jaxtyping import Float, Int
from safetensors.torch import save_file
from torch import Tensor

from tl_depass import commands
from tl_depass.apd.train import CHECKPOINT_NAME, load_checkpoint
from tl_depass.engine.files import read_json, require_keys
from tl_depass.errors import DepassError

__all__ = ["FORMAT", "LAYOUT", "artifact_name", "reduced_rank", "write_artifact", "export_run", "main"]

FORMAT = "tl_depass.apd.artifact/1"
LAYOUT = (
    "x @ W convention; per decomposed matrix (site) <site>/target [d_in, d_out] and either "
    "<site>/A [C, d_in, m] with <site>/B [C, m, d_out] (component c = A[c] @ B[c]) or "
    "<site>/components [C, d_in, d_out] or (reduced rank) <site>/A_packed [R, d_in], "
    "<site>/B_packed [R, d_out], <site>/ranks [C]: component c = the sum over its ranks[c] "
    "consecutive rows (component 0's first) of outer(A_packed[k], B_packed[k]); "
    "the target's other weights under target/<name>. "
    "Metadata 'feature_site' names the site whose rows are the input features (MMCS/ML2R)."
)
MAX_BYTES = 10 * 2**20
PACKED = ("A_packed", "B_packed", "ranks")
#: how far a reduced-rank file's MMCS may move from the run's before export refuses it
REDUCED_MMCS_TOLERANCE = 1e-3
#: a residual MLP's top-k loss over the target's, from the file (float64) vs the run's float32
#: evaluation: the batch top-k masks differ where attributions tie in float32 (resid-mlp-1, step
#: 10 556, the same weights: 1.12340 in float64, 1.12190 in float32)
LOSS_RATIO_TOLERANCE = 5e-3


def artifact_name(results: dict, full_recipe: bool = True) -> str:
    """`<experiment>-<method>_seed<s>`, plus `_steps<N>_batch<B>` for a shortened recipe or a run
    stopped early."""
    base = f"{results['experiment'].replace('/', '-')}_seed{results['seed']}"
    if results.get("decomposition_seed", results["seed"]) != results["seed"]:
        base += f"_dseed{results['decomposition_seed']}"
    changed = f"_{results['changed_settings']}" if results.get("changed_settings") else ""
    if full_recipe and not changed and results.get("trained_steps", results["steps"]) == results[
            "steps"]:
        return base
    steps = results.get("trained_steps", results["steps"])
    return base + f"_steps{steps}_batch{results['batch_size']}{changed}"


def _factors(objective: dict[str, Tensor], method: str) -> dict[str, tuple[Tensor, Tensor]]:
    """Per matrix key (dots as "__"), the factors (first [C, d_in, m], second [C, m, d_out])."""
    if method == "apd":
        return {k[2:]: (v, objective[f"B.{k[2:]}"]) for k, v in objective.items()
                if k.startswith("A.")}
    return {k[2:]: (v.T[:, :, None], objective[f"U.{k[2:]}"][:, None, :])
            for k, v in objective.items() if k.startswith("V.")}


def reduced_rank(
    first: Float[Tensor, "C d_in m"], second: Float[Tensor, "C m d_out"], tol: float
) -> tuple[Float[Tensor, "R d_in"], Float[Tensor, "R d_out"], Int[Tensor, " C"], dict]:
    """The components `first[c] @ second[c]` refactored at their numerical rank, packed: singular
    values at most `tol` times the largest of any component here are dropped; each kept one gives
    a row `σ·u` of A_packed and `v` of B_packed (component 0's first), `ranks` counts them per
    component. Also returns what was kept and dropped."""
    u, s, vh = torch.linalg.svd(first.double() @ second.double(), full_matrices=False)
    keep = s > tol * s.max()  # a prefix of each component's (descending) singular values
    dropped = s * ~keep
    info = {"rank": int(keep.sum(-1).max()), "ranks": keep.sum(-1).tolist(),
            "largest_dropped": dropped.max().item(), "dropped_norm": dropped.norm().item(),
            "largest_kept": s.max().item()}
    a_rows = (u * s[:, None, :]).transpose(1, 2)[keep]
    return a_rows, vh[keep], keep.sum(-1).int(), info


def write_artifact(
    objective: dict[str, Tensor], results: dict, path: Path, dtype: torch.dtype = torch.float32,
    rank_tol: float | None = None,
) -> dict:
    """Write the decomposition in `objective` (an APD or SPD state dict) and its target to `path`;
    returns the metrics recorded in the file (computed from the stored, cast tensors). With
    `rank_tol`, components are stored at their numerical rank (`reduced_rank`)."""
    from tl_depass.apd.check import headline_metrics  # the check's own code fixes the numbers

    method = results["experiment"].rsplit("/", 1)[-1]
    factors = _factors(objective, method)
    if not factors:
        raise DepassError(f"no {method.upper()} factors in the checkpoint of {path.name}: export "
                          "APD or SPD runs only")
    tensors: dict[str, Tensor] = {}
    full_rank: dict[str, Tensor] = {}
    reductions = {}
    for key, (first, second) in factors.items():
        site = key.replace("__", ".")
        tensors[f"{site}/target"] = objective[f"target.{key}"]
        if rank_tol is None:
            tensors[f"{site}/A"], tensors[f"{site}/B"] = first, second
        else:
            full_rank[f"{site}/A"], full_rank[f"{site}/B"] = first, second
            *packed, reductions[site] = reduced_rank(first, second, rank_tol)
            tensors |= {f"{site}/{part}": v for part, v in zip(PACKED, packed, strict=True)}
    for name, value in objective.items():
        if name.startswith("target.") and name[7:] not in factors:
            tensors[f"target/{name[7:].replace('__', '.')}"] = value
    tensors = {k: v.detach().to("cpu", v.dtype if k.endswith("/ranks") else dtype).contiguous()
               .clone() for k, v in tensors.items()}
    config = results.get("config", {})
    is_tms = "n_hidden" in config.get("target", {})
    meta = {
        "format": FORMAT,
        "layout": LAYOUT,
        "experiment": results["experiment"],
        "method": method,
        "seed": str(results["seed"]),
        "decomposition_seed": str(results.get("decomposition_seed", results["seed"])),
        "steps": str(results["steps"]),
        "trained_steps": str(results.get("trained_steps", results["steps"])),
        "batch_size": str(results["batch_size"]),
        "changed_settings": results.get("changed_settings", ""),
        "target": json.dumps(config.get("target", {})),
        "method_config": json.dumps(config.get("method", {})),
        "feature_site": "W" if is_tms else "",
    }
    metrics = headline_metrics(tensors, meta["feature_site"], meta)
    meta["metrics"] = json.dumps(metrics)
    if rank_tol is not None:
        full = {k: v for k, v in tensors.items() if k.rsplit("/", 1)[-1] not in PACKED} | {
            k: v.detach().to("cpu", dtype) for k, v in full_rank.items()}
        meta["reduced_rank"] = json.dumps({
            "tol": rank_tol, "sites": reductions,
            "full_rank_metrics": headline_metrics(full, meta["feature_site"], meta)})
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=meta)
    size = path.stat().st_size
    if size > MAX_BYTES:
        path.unlink()
        raise DepassError(f"{path} would be {size} bytes, more than 10 MB: export with "
                          "--dtype float16, or store components at their numerical rank with "
                          "--rank-tol (e.g. 1e-3)")
    return metrics


def export_run(run_dir: Path, out_dir: Path, dtype: torch.dtype = torch.float32,
               rank_tol: float | None = None) -> Path:
    """The artefact of the finished run in `run_dir` (its checkpoint and results.json), written
    to `out_dir`; its MMCS (within REDUCED_MMCS_TOLERANCE more when `rank_tol` drops small
    singular values), distinct top-1 components and top-k loss ratio (residual MLPs, within
    LOSS_RATIO_TOLERANCE more) must match the run's own evaluation."""
    results = read_json(run_dir / "results.json", "run results")
    require_keys(results, ("experiment", "seed", "steps", "batch_size"), run_dir, "results.json")
    state = load_checkpoint(run_dir / CHECKPOINT_NAME)
    if state["step"] != results.get("trained_steps", results["steps"]):
        raise DepassError(f"{run_dir}: checkpoint at step {state['step']} but results.json "
                          f"describes step {results.get('trained_steps')}: rerun the reproduction "
                          "to refresh results.json")
    if "changed_settings" not in results:  # runs from before --set named it in results.json
        results["changed_settings"] = run_dir.name.partition(f"_batch{results['batch_size']}_")[2]
    path = out_dir / f"{artifact_name(results, _is_preset(results))}.safetensors"
    metrics = write_artifact(state["objective"], results, path, dtype, rank_tol)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-3
    if rank_tol is not None:
        tolerance += REDUCED_MMCS_TOLERANCE
    limits = {"mmcs": tolerance, "topk_loss_over_target": tolerance + LOSS_RATIO_TOLERANCE,
              "distinct_top1_components": 0}
    moved = []
    for name, limit in limits.items():
        if name in results and name in metrics:
            ours, theirs = (v[0] if isinstance(v, list) else v for v in (metrics[name], results[name]))
            if abs(ours - theirs) > limit:
                moved.append(f"{name} {ours:.6g} from the file, {theirs:.6g} in the run's results")
    if moved:
        path.unlink()
        why = (f"--rank-tol {rank_tol} dropped too much: use a smaller one, or" if rank_tol
               is not None else "")
        raise DepassError(f"{path}: {'; '.join(moved)}; {why} the checkpoint and results.json "
                          f"in {run_dir} do not belong together")
    return path


def _is_preset(results: dict) -> bool:
    """Whether the run used its preset's optimiser settings (steps, batch, schedule) unchanged."""
    from tl_depass.apd.experiments.presets import PRESETS

    known = PRESETS.get(results["experiment"])
    ran = results.get("config", {}).get("method", {}).get("optim")
    return known is not None and dataclasses.asdict(known.method.optim) == ran


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run_dirs", nargs="+", type=Path, help="finished reproduction run folders")
    parser.add_argument("--out", type=Path, default=Path("docs/apd_artifacts"))
    parser.add_argument("--dtype", choices=["float32", "float16"], default="float32")
    parser.add_argument("--rank-tol", type=float, default=None,
                        help="store each component at its numerical rank: drop singular values "
                             "at most this times the site's largest (e.g. 1e-3)")
    args = parser.parse_args(argv)
    if args.rank_tol is not None and not 0 <= args.rank_tol < 1:
        raise DepassError(f"--rank-tol {args.rank_tol} is not in [0, 1): give a relative "
                          "tolerance such as 1e-3")
    for run_dir in args.run_dirs:
        path = export_run(run_dir, args.out, getattr(torch, args.dtype), args.rank_tol)
        print(f"{path} ({path.stat().st_size / 1024:.0f} KiB)")
    return 0


if __name__ == "__main__":
    commands.run_command("python -m tl_depass.apd.export", main)
