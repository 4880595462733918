"""Artefacts: export writes a self-describing safetensors file, `check` recomputes its numbers
from the file alone and refuses malformed files; the committed artefacts give the numbers that
docs/apd_results.md reports."""

import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch.testing import assert_close

from tl_depass.apd.apd import APD
from tl_depass.apd.check import (
    headline_metrics,
    main,
    read_artifact,
    residual_mlp_apd,
    site_components,
    unpacked,
)
from tl_depass.apd.configs import APDConfig, OptimConfig, ResidualMLPConfig, TMSConfig
from tl_depass.apd.experiments.components import feature_table
from tl_depass.apd.experiments.presets import preset, shortened
from tl_depass.apd.export import export_run, write_artifact
from tl_depass.apd.export import main as export_main
from tl_depass.apd.metrics import (
    RESIDUAL_ONE_HOT,
    alive_count,
    loss_scores,
    mmcs_ml2r,
    top1_components,
)
from tl_depass.apd.reproduce import main as reproduce
from tl_depass.apd.spd import SPD
from tl_depass.apd.targets import make_target
from tl_depass.commands import report_errors
from tl_depass.errors import DepassError

ROOT = Path(__file__).parents[2]
ARTIFACTS = ROOT / "docs" / "apd_artifacts"
# docs/apd_results.md, section "Artefacts": | `file` | command | MMCS ± | ML2R ± | alive | ...
ROW = re.compile(r"^\| `(?P<file>[^`]+\.safetensors)` \|[^|]*\| (?P<mmcs>[0-9.]+) ± [0-9.]+ \| "
                 r"(?P<ml2r>[0-9.]+) ± [0-9.]+ \| (?P<alive>\d+) \|", re.MULTILINE)
# and its residual-MLP table: | `file` | command | distinct top-1 | top-k loss / target | within 10% |
RESIDUAL_ROW = re.compile(r"^\| `(?P<file>[^`]+\.safetensors)` \|[^|]*\| (?P<distinct>\d+) \| "
                          r"(?P<ratio>[0-9.]+) \| (?P<within>\d+) \|", re.MULTILINE)


def documented() -> dict[str, dict]:
    text = (ROOT / "docs" / "apd_results.md").read_text(encoding="utf-8")
    tms = {m["file"]: {"mmcs": float(m["mmcs"]), "ml2r": float(m["ml2r"]),
                       "alive": int(m["alive"]), "digits": len(m["mmcs"].split(".")[1])}
           for m in ROW.finditer(text)}
    return tms | {m["file"]: {"distinct": int(m["distinct"]), "ratio": float(m["ratio"]),
                              "within": int(m["within"]), "digits": len(m["ratio"].split(".")[1])}
                  for m in RESIDUAL_ROW.finditer(text)}


def exit_status(argv: list[str]) -> int:
    return report_errors("check", lambda: main(argv))


@pytest.fixture
def tiny_apd() -> APD:
    target = make_target(TMSConfig(n_features=5, n_hidden=2, seed=3)).double()
    cfg = shortened(preset("tms-5-2", "apd"), steps=1, batch_size=8).method
    return APD(target, cfg)


@pytest.mark.parametrize(("dtype", "rel"), [(torch.float64, 1e-12), (torch.float16, 3e-3)])
def test_write_then_check_recomputes_the_metrics_of_the_decomposition(tiny_apd, tmp_path, capsys,
                                                                      dtype, rel):
    results = {"experiment": "tms-5-2/apd", "seed": 3, "steps": 1, "batch_size": 8,
               "config": {"target": {"n_features": 5, "n_hidden": 2}}}
    path = tmp_path / "tiny.safetensors"
    recorded = write_artifact(tiny_apd.state_dict(), results, path, dtype)
    tensors, meta = read_artifact(path)
    assert set(tensors) == {"W/target", "W/A", "W/B", "target/b_final"}
    assert all(t.dtype == dtype for t in tensors.values())
    assert tensors["W/A"].shape == (5, 5, 3) and tensors["W/B"].shape == (5, 3, 2)
    assert meta["feature_site"] == "W" and meta["method"] == "apd"
    weights = tiny_apd.component_weights("W").detach()
    match = mmcs_ml2r(tiny_apd.target.W.detach(), weights)
    assert recorded["mmcs"] == pytest.approx(list(match.mmcs), rel=rel)
    assert recorded["ml2r"] == pytest.approx(list(match.ml2r), rel=rel)
    assert recorded["alive"] == {"W": alive_count(tiny_apd, "W")}
    assert recorded["faithfulness"]["W"] == pytest.approx(
        (weights.sum(0) - tiny_apd.target.W).norm().item(), rel=rel, abs=rel)
    assert exit_status([str(path)]) == 0
    out = capsys.readouterr().out
    assert "MMCS" in out and "= the numbers recorded at export" in out


def test_components_layout_with_known_answer(tmp_path, capsys):
    target = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 0.0]])
    comps = torch.zeros(4, 3, 2)
    comps[0, 0], comps[1, 1], comps[2, 2] = target[0], target[1] * 0.5, target[2]
    comps[3, 1] = target[1] * 0.5  # feature 1 split in halves: cosine 1, norm ratio 0.5
    path = tmp_path / "known.safetensors"
    save_file({"W/target": target, "W/components": comps, "target/b_final": torch.zeros(3)},
              str(path), metadata={"format": "tl_depass.apd.artifact/1", "feature_site": "W"})
    assert exit_status([str(path), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)[str(path)]
    assert got["alive"] == {"W": 4}
    assert got["faithfulness"]["W"] == pytest.approx(0.0, abs=1e-12)
    assert_close(torch.tensor(got["mmcs"]), torch.tensor([1.0, 0.0]), atol=1e-9, rtol=0)
    ml2r = torch.tensor([1.0, 0.5, 1.0])
    assert_close(torch.tensor(got["ml2r"]), torch.stack([ml2r.mean(), ml2r.std(unbiased=False)]),
                 atol=1e-7, rtol=0)


GOOD = {"W/target": torch.ones(3, 2), "W/A": torch.ones(4, 3, 1), "W/B": torch.ones(4, 1, 2)}
META = {"format": "tl_depass.apd.artifact/1", "feature_site": "W"}


@pytest.mark.parametrize(
    ("tensors", "meta", "message"),
    [
        ({k: v for k, v in GOOD.items() if k != "W/target"}, META, "lacks W/target"),
        ({**GOOD, "W/B": torch.ones(4, 2, 2)}, META, "not \\[C, d_in, m\\] and \\[C, m, d_out\\]"),
        ({**GOOD, "W/components": torch.ones(4, 2, 2)}, META, "not \\[C, 3, 2\\]"),
        ({"W/target": torch.ones(3, 2), "W/A": torch.ones(4, 3, 1)}, META, "needs W/components"),
        ({**GOOD, "junk": torch.ones(1)}, META, "unexpected tensor 'junk'"),
        ({**GOOD, "W/target": torch.full((3, 2), float("nan"))}, META, "NaN"),
        ({**GOOD, "V/target": torch.ones(2, 2), "V/components": torch.ones(5, 2, 2)}, META,
         "different numbers of components"),
        (GOOD, {"feature_site": "W"}, "no 'format' metadata"),
        (GOOD, {**META, "feature_site": "X"}, "feature site 'X' is not among"),
        (GOOD, {**META, "metrics": json.dumps({"alive": {"W": 1}})}, "does not reproduce"),
        (GOOD, {**META, "metrics": "{"}, "not JSON"),
        ({"W/target": torch.ones(3, 2), "W/A_packed": torch.ones(4, 3),
          "W/B_packed": torch.ones(4, 2), "W/ranks": torch.tensor([1, 1, 1])}, META,
         "ranks must be non-negative integers summing to the 4 packed rows"),
        ({"W/target": torch.ones(3, 2), "W/A_packed": torch.ones(4, 3),
          "W/B_packed": torch.ones(3, 2), "W/ranks": torch.tensor([2, 2])}, META,
         "are not \\[R, d_in\\], \\[R, d_out\\] and \\[C\\]"),
    ],
)
def test_malformed_files_exit_non_zero_with_a_clear_error(tmp_path, capsys, tensors, meta,
                                                          message):
    path = tmp_path / "bad.safetensors"
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(DepassError, match=message):
        main([str(path)])
    assert exit_status([str(path)]) == 1
    assert "check: error: artefact" in capsys.readouterr().err


def test_unreadable_files_exit_non_zero(tmp_path, capsys):
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file at all")
    assert exit_status([str(garbage)]) == 1
    assert exit_status([str(tmp_path / "missing.safetensors")]) == 1
    err = capsys.readouterr().err
    assert "not a readable safetensors file" in err


def test_export_of_a_reproduction_run_matches_its_results(tmp_path, capsys):
    torch.set_default_dtype(torch.float32)
    args = ["tms-5-2", "--method", "apd", "--steps", "5", "--target-steps", "5", "--batch-size",
            "64", "--runs", str(tmp_path / "runs"), "--figures", str(tmp_path / "fig"),
            "--no-progress"]
    results = reproduce(args)
    run_dir = next((tmp_path / "runs").rglob("results.json")).parent
    path = export_run(run_dir, tmp_path / "artifacts")
    assert path.name == "tms-5-2-apd_seed0_steps5_batch64.safetensors"  # shortened: says so
    tensors, meta = read_artifact(path)
    got = headline_metrics(tensors, meta["feature_site"])
    assert got["mmcs"] == pytest.approx(list(results["mmcs"]), abs=1e-6)
    assert got["ml2r"] == pytest.approx(list(results["ml2r"]), abs=1e-6)
    assert got["alive"] == results["alive"]
    assert json.loads(meta["target"])["n_features"] == 5
    assert exit_status([str(path)]) == 0


def test_the_committed_artefacts_give_the_documented_numbers(capsys):
    files = sorted(ARTIFACTS.glob("*.safetensors"))
    docs = documented()
    assert files, "no artefacts committed under docs/apd_artifacts"
    assert {f.name for f in files} == set(docs), "the Artefacts tables of docs/apd_results.md " \
        "list every committed artefact and nothing else"
    for path in files:
        assert path.stat().st_size <= 10 * 2**20
        meta = read_artifact(path)[1]
        assert path.name.startswith(meta["experiment"].replace("/", "-") + "_seed")
        assert main([str(path), "--json"]) == 0  # also: the numbers the file records
        got, want = json.loads(capsys.readouterr().out)[str(path)], docs[path.name]
        tol = 0.51 * 10 ** -want["digits"]
        if "mmcs" in want:
            assert got["mmcs"][0] == pytest.approx(want["mmcs"], abs=tol), path.name
            assert got["ml2r"][0] == pytest.approx(want["ml2r"], abs=0.51e-3), path.name
            assert got["alive"][meta["feature_site"]] == want["alive"], path.name
        else:
            assert got["distinct_top1_components"] == want["distinct"], path.name
            assert got["topk_loss_over_target"] == pytest.approx(want["ratio"], abs=tol), path.name
            assert got["features_topk_within_10pct"] == want["within"], path.name


def test_components_table_reads_an_artefact(tiny_apd, tmp_path):
    results = {"experiment": "tms-5-2/apd", "seed": 3, "steps": 1, "batch_size": 8,
               "config": {"target": {"n_features": 5, "n_hidden": 2}}}
    path = tmp_path / "tiny.safetensors"
    write_artifact(tiny_apd.state_dict(), results, path)
    table = feature_table(path).splitlines()
    assert len(table) == 1 + 2 + 5  # title, header, rule, one row per component
    assert table[1] == "| component | norm | f0 | f1 | f2 | f3 | f4 |"


def test_changed_settings_name_the_run_and_its_artefact(tmp_path):
    torch.set_default_dtype(torch.float32)
    args = ["tms-5-2", "--method", "apd", "--steps", "3", "--target-steps", "3", "--batch-size",
            "32", "--runs", str(tmp_path / "runs"), "--figures", str(tmp_path / "fig"),
            "--no-progress", "--set", "simplicity_coeff=0.5"]
    results = reproduce(args)
    assert results["changed_settings"] == "simplicity_coeff0.5"
    assert results["config"]["method"]["simplicity_coeff"] == 0.5
    run_dir = next((tmp_path / "runs").rglob("results.json")).parent
    assert run_dir.name == "tms-5-2-apd_seed0_steps3_batch32_simplicity_coeff0.5"
    path = export_run(run_dir, tmp_path)
    assert path.name == "tms-5-2-apd_seed0_steps3_batch32_simplicity_coeff0.5.safetensors"
    assert read_artifact(path)[1]["changed_settings"] == "simplicity_coeff0.5"


def test_python_dash_m_check_exit_status_and_one_line_error(tmp_path):
    good = tmp_path / "good.safetensors"
    save_file(GOOD, str(good), metadata=META)
    bad = tmp_path / "bad.safetensors"
    save_file({"W/target": torch.ones(3, 2)}, str(bad), metadata=META)
    done = subprocess.run([sys.executable, "-m", "tl_depass.apd.check", str(good), str(bad)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert "good.safetensors" in done.stdout and "MMCS" in done.stdout
    assert done.stderr.startswith("python -m tl_depass.apd.check: error: artefact ")
    assert "needs W/components, both W/A and W/B, or W/A_packed" in done.stderr


def test_spd_runs_export_as_rank_one_factors(tmp_path):
    target = make_target(TMSConfig(n_features=5, n_hidden=2, seed=1)).double()
    spd = SPD(target, shortened(preset("tms-5-2", "spd"), steps=1, batch_size=8).method)
    results = {"experiment": "tms-5-2/spd", "seed": 1, "steps": 1, "batch_size": 8,
               "config": {"target": {"n_features": 5, "n_hidden": 2}}}
    path = tmp_path / "spd.safetensors"
    recorded = write_artifact(spd.state_dict(), results, path, torch.float64)
    tensors, _ = read_artifact(path)
    assert tensors["W/A"].shape == (20, 5, 1) and tensors["W/B"].shape == (20, 1, 2)
    assert_close(tensors["W/A"] @ tensors["W/B"], spd.subcomponent_weights("W").detach())
    assert recorded["alive"] == {"W": alive_count(spd, "W")}


def test_reduced_rank_export_keeps_each_component_at_its_numerical_rank(tiny_apd, tmp_path, capsys):
    """Known answer: components of rank 1 (plus noise at 1e-7 of their size) and one zero
    component come back at rank 1 and 0, within the noise, and check reproduces the file."""
    gen = torch.Generator().manual_seed(0)
    state = tiny_apd.state_dict()
    u, v = torch.randn(5, 5, 1, generator=gen).double(), torch.randn(5, 1, 2, generator=gen).double()
    a = torch.cat([u, 1e-7 * torch.randn(5, 5, 2, generator=gen).double()], -1)
    a[3] = 0  # component 3 is dead (MMCS is scale-free: a tiny one would still count)
    b = torch.cat([v, torch.randn(5, 2, 2, generator=gen).double()], 1)
    state["A.W"], state["B.W"] = a, b
    results = {"experiment": "tms-5-2/apd", "seed": 3, "steps": 1, "batch_size": 8,
               "config": {"target": {"n_features": 5, "n_hidden": 2}}}
    path = tmp_path / "reduced.safetensors"
    recorded = write_artifact(state, results, path, torch.float64, rank_tol=1e-4)
    tensors, meta = read_artifact(path)
    assert "W/A" not in tensors and tensors["W/ranks"].tolist() == [1, 1, 1, 0, 1]
    assert tensors["W/A_packed"].shape == (4, 5) and tensors["W/B_packed"].shape == (4, 2)
    reduction = json.loads(meta["reduced_rank"])
    assert reduction["tol"] == 1e-4
    assert reduction["sites"]["W"]["ranks"] == [1, 1, 1, 0, 1]
    assert 0 < reduction["sites"]["W"]["largest_dropped"] < 1e-5
    assert_close(site_components(tensors)["W"][1], a @ b, atol=1e-5, rtol=0)
    assert recorded["alive"]["W"] == 4
    full = reduction["full_rank_metrics"]
    assert full["mmcs"] == pytest.approx(recorded["mmcs"], abs=1e-5)
    assert full["faithfulness"]["W"] == pytest.approx(recorded["faithfulness"]["W"], abs=1e-5)
    assert exit_status([str(path)]) == 0
    assert "= the numbers recorded at export" in capsys.readouterr().out


def test_reduced_rank_export_of_a_run_and_bad_tolerance(tmp_path, capsys):
    torch.set_default_dtype(torch.float32)
    args = ["tms-5-2", "--method", "apd", "--steps", "5", "--target-steps", "5", "--batch-size",
            "64", "--runs", str(tmp_path / "runs"), "--figures", str(tmp_path / "fig"),
            "--no-progress"]
    reproduce(args)
    run_dir = next((tmp_path / "runs").rglob("results.json")).parent
    path = export_run(run_dir, tmp_path / "artifacts", rank_tol=0.0)  # drops exact zeros only
    assert exit_status([str(path)]) == 0
    capsys.readouterr()
    assert report_errors("export", lambda: export_main([str(run_dir), "--rank-tol", "2"])) == 1
    assert "--rank-tol 2.0 is not in [0, 1)" in capsys.readouterr().err


def test_packed_factors_unpack_to_each_components_rows():
    """Known answer: ranks [2, 0, 1] put rows 0-1 in component 0, none in 1, row 2 in 2."""
    a_rows, b_rows = torch.arange(9.0).reshape(3, 3), torch.arange(6.0).reshape(3, 2) - 2
    first, second = unpacked(a_rows, b_rows, torch.tensor([2, 0, 1]))
    assert first.shape == (3, 3, 2) and second.shape == (3, 2, 2)
    comps = first @ second
    assert_close(comps[0], torch.outer(a_rows[0], b_rows[0]) + torch.outer(a_rows[1], b_rows[1]))
    assert_close(comps[1], torch.zeros(3, 2))
    assert_close(comps[2], torch.outer(a_rows[2], b_rows[2]))


def residual_apd() -> tuple[APD, dict]:
    """A 2-layer residual MLP, every weight randomised, and an APD of it with random components;
    the results dictionary a run of it would write."""
    target_cfg = ResidualMLPConfig(n_features=6, d_embed=9, d_mlp=3, n_layers=2,
                                   feature_prob=0.3, seed=12)
    target = make_target(target_cfg)
    with torch.no_grad():
        for param in target.parameters():
            param.add_(0.3 * torch.randn(param.shape, generator=torch.Generator().manual_seed(0)))
    cfg = APDConfig(C=5, m=None, topk=1.5, optim=OptimConfig(lr=1e-3, steps=1, batch_size=64),
                    act_recon_coeff=1.0, init="xavier", seed=3)
    results = {"experiment": "resid-mlp-2/apd", "seed": 12, "steps": 1, "batch_size": 64,
               "config": {"target": dataclasses.asdict(target_cfg),
                          "method": dataclasses.asdict(cfg)}}
    return APD(target, cfg), results


@pytest.mark.parametrize("rank_tol", [None, 0.0])
def test_residual_mlp_check_runs_the_decomposition_the_file_describes(tmp_path, capsys, rank_tol):
    """From the file alone (full factors or packed at their rank), check rebuilds the target and
    its APD and gets the distinct top-1 components and the per-feature losses of the original."""
    apd, results = residual_apd()
    path = tmp_path / "resid.safetensors"
    recorded = write_artifact(apd.state_dict(), results, path, torch.float64, rank_tol)
    tensors, meta = read_artifact(path)
    rebuilt = residual_mlp_apd(tensors, meta)
    for name in apd.target.matrix_names:
        assert_close(rebuilt.component_weights(name), apd.component_weights(name).detach(),
                     rtol=1e-10, atol=1e-12, msg=lambda m, name=name: f"{name}: {m}")
    best = top1_components(apd, RESIDUAL_ONE_HOT)
    assert recorded["distinct_top1_components"] == len(set(best.tolist()))
    want = loss_scores(apd)
    assert recorded["topk_loss_over_target"] == pytest.approx(want["topk_loss_over_target"],
                                                              rel=1e-9)
    assert recorded["features_topk_within_10pct"] == want["features_topk_within_10pct"]
    for key, losses in want["feature_losses"].items():
        assert recorded["feature_losses"][key] == pytest.approx(losses, rel=1e-9), key
    assert exit_status([str(path)]) == 0
    assert "= the numbers recorded at export" in capsys.readouterr().out


def test_residual_mlp_file_whose_weights_do_not_fit_its_config_is_refused(tmp_path, capsys):
    apd, results = residual_apd()
    results["config"]["target"]["d_embed"] = 10
    path = tmp_path / "resid.safetensors"
    with pytest.raises(DepassError, match="do not fit the target its metadata describes"):
        write_artifact(apd.state_dict(), results, path, torch.float64)
