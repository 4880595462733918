"""Training: a short TMS 5-2 run whose loss falls, bit-identical resume, schedule, CLI smoke."""

import dataclasses
import json
import signal

import pytest
import torch
from torch.testing import assert_close

from tl_depass.apd.apd import APD
from tl_depass.apd.configs import OptimConfig, ResidualMLPConfig, TMSConfig
from tl_depass.apd.experiments.presets import preset, shortened
from tl_depass.apd.reproduce import evaluate, main
from tl_depass.apd.spd import SPD
from tl_depass.apd.targets import make_target
from tl_depass.apd.train import TargetObjective, lr_factor, train
from tl_depass.errors import DepassError


@pytest.fixture
def sigint_default():
    """Python's own SIGINT handler for the test, however pytest was started: a background job
    (`nohup`, `&` in a script) inherits SIGINT ignored, which `train` respects."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.fixture(scope="module")
def tms_5_2():
    """A TMS 5-2 target trained briefly (float32, as the reproduction runs)."""
    target = make_target(TMSConfig(n_features=5, n_hidden=2, seed=0))
    cfg = OptimConfig(lr=5e-3, steps=400, batch_size=256, optimizer="adamw", weight_decay=0.01)
    history = train(
        TargetObjective(target), target.sample, cfg, 0, None, log_every=50, progress="none"
    )
    assert history[-1]["loss"] < 0.5 * history[0]["loss"]
    return target.float()


@pytest.mark.parametrize("method", ["apd", "spd"])
def test_short_tms_5_2_run_loss_falls(tms_5_2, method):
    torch.set_default_dtype(torch.float32)
    config = shortened(preset("tms-5-2", method), steps=200, batch_size=512)
    model = APD(tms_5_2, config.method) if method == "apd" else SPD(tms_5_2, config.method)
    history = train(
        model, tms_5_2.sample, config.method.optim, 1, None, log_every=20, progress="none"
    )
    assert history[-1]["loss"] < 0.5 * history[0]["loss"]
    assert history[-1]["faithfulness"] < history[0]["faithfulness"]


@pytest.mark.parametrize("method", ["apd", "spd"])
def test_resume_after_interruption_gives_identical_numbers(tmp_path, method):
    target = make_target(TMSConfig(n_features=5, n_hidden=2, hidden_identity="identity", seed=2))
    cfg = shortened(preset("tms-5-2", method), steps=30, batch_size=64).method
    cfg = dataclasses.replace(
        cfg, optim=dataclasses.replace(cfg.optim, warmup_frac=0.1, schedule="cosine")
    )

    def build():
        return APD(target, cfg) if method == "apd" else SPD(target, cfg)

    straight = build()
    expected = train(
        straight,
        target.sample,
        cfg.optim,
        3,
        tmp_path / "a",
        checkpoint_every=10,
        log_every=5,
        progress="none",
    )
    first = build()
    train(
        first,
        target.sample,
        cfg.optim,
        3,
        tmp_path / "b",
        checkpoint_every=10,
        log_every=5,
        stop_at=17,
        progress="none",
    )
    resumed = build()  # a fresh process would start from scratch like this
    history = train(
        resumed,
        target.sample,
        cfg.optim,
        3,
        tmp_path / "b",
        checkpoint_every=10,
        log_every=5,
        progress="none",
    )
    assert history == expected
    for (name, a), (_, b) in zip(
        straight.state_dict().items(), resumed.state_dict().items(), strict=True
    ):
        assert_close(a, b, rtol=0, atol=0, msg=f"{name} differs after resume")
    logged = [
        json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    ]
    assert logged == expected


def test_lr_schedule_warmup_then_cosine_to_zero():
    cfg = OptimConfig(lr=1.0, steps=100, batch_size=1, schedule="cosine", warmup_frac=0.1)
    assert lr_factor(0, cfg) == pytest.approx(0.1)
    assert lr_factor(9, cfg) == pytest.approx(1.0)
    assert lr_factor(10, cfg) == pytest.approx(1.0)
    assert lr_factor(55, cfg) == pytest.approx(0.5)
    assert lr_factor(99, cfg) == pytest.approx(
        0.5 * (1 + torch.cos(torch.tensor(89 / 90 * torch.pi)).item())
    )


def test_reproduce_cli_stops_resumes_and_writes_results_and_figures(tmp_path):
    torch.set_default_dtype(torch.float32)
    args = ["tms-5-2", "--method", "spd", "--steps", "20", "--target-steps", "50"]
    args += ["--batch-size", "128", "--runs", str(tmp_path / "runs"), "--no-progress"]
    args += ["--figures", str(tmp_path / "fig")]
    partial = main(args + ["--stop-at", "10"])
    assert partial["trained_steps"] == 10
    results = main(args)  # resumes from the step-10 checkpoint
    assert results["steps"] == results["trained_steps"] == 20
    assert set(results["alive"]) == {"W"} and 0.0 <= results["mmcs"][0] <= 1.0 + 1e-6
    assert {p.name for p in (tmp_path / "fig").iterdir()} >= {
        "tms-5-2-spd_seed0_steps20_batch128_stopped10_ci.png",
        "tms-5-2-spd_seed0_steps20_batch128_ci.png",
        "tms-5-2-spd_seed0_steps20_batch128_norms.png",
        "tms-5-2-spd_seed0_steps20_batch128_features.png",
    }
    saved = json.loads(next((tmp_path / "runs").rglob("results.json")).read_text())
    assert saved["mmcs"] == list(results["mmcs"])


def test_two_layer_residual_mlp_evaluation_reports_each_layers_share(tmp_path):
    """The 2-layer residual MLP's evaluation: per-feature losses, and how each feature's best
    component splits its neuron contributions over the two layers (the paper's cross-layer
    figure), beside the target's split."""
    cfg = ResidualMLPConfig(n_features=6, d_embed=9, d_mlp=3, n_layers=2, feature_prob=0.3, seed=5)
    method = shortened(preset("resid-mlp-2", "apd"), steps=2, batch_size=64).method
    apd = APD(make_target(cfg), dataclasses.replace(method, C=8))
    results = evaluate(apd, tmp_path, "tiny")
    for who in ("target", "best_components"):
        assert sum(results["layer_share"][who]) == pytest.approx(1.0)
        assert 0 <= results["features_with_10pct_in_every_layer"][who] <= 6
    assert len(results["feature_losses"]["apd_topk"]) == 6
    assert (tmp_path / "tiny_neurons.png").stat().st_size > 0


def test_ctrl_c_ends_after_the_step_and_resumes_identically(tmp_path, sigint_default):
    """SIGINT in the middle of a step (here: while sampling step 14's batch) finishes that step,
    writes a checkpoint and raises; resuming gives the uninterrupted run's numbers."""
    target = make_target(TMSConfig(n_features=5, n_hidden=2, seed=4))
    cfg = shortened(preset("tms-5-2", "spd"), steps=20, batch_size=32).method
    calls = []

    def interrupting_sample(batch, generator):
        calls.append(1)
        if len(calls) == 14:
            signal.raise_signal(signal.SIGINT)
        return target.sample(batch, generator)

    straight = SPD(target, cfg)
    expected = train(straight, target.sample, cfg.optim, 5, None, log_every=1, progress="none")
    with pytest.raises(KeyboardInterrupt, match="interrupted after step 14; checkpoint in"):
        train(SPD(target, cfg), interrupting_sample, cfg.optim, 5, tmp_path, log_every=1)
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step"] == 14
    resumed = SPD(target, cfg)
    history = train(resumed, target.sample, cfg.optim, 5, tmp_path, log_every=1, progress="none")
    assert history == expected
    for (name, a), (_, b) in zip(
        straight.state_dict().items(), resumed.state_dict().items(), strict=True
    ):
        assert_close(a, b, rtol=0, atol=0, msg=f"{name} differs after resume")
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored


def test_ctrl_c_stays_ignored_where_sigint_is_ignored(tmp_path):
    """A background job starts with SIGINT ignored: train neither installs its handler nor
    stops, and leaves SIGINT ignored."""
    target = make_target(TMSConfig(n_features=5, n_hidden=2, seed=4))
    cfg = shortened(preset("tms-5-2", "spd"), steps=6, batch_size=16).method
    calls = []

    def interrupting_sample(batch, generator):
        calls.append(1)
        if len(calls) == 3:
            signal.raise_signal(signal.SIGINT)
        return target.sample(batch, generator)

    expected = train(SPD(target, cfg), target.sample, cfg.optim, 5, None, log_every=1,
                     progress="none")
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        history = train(SPD(target, cfg), interrupting_sample, cfg.optim, 5, tmp_path,
                        log_every=1, progress="none")
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    except KeyboardInterrupt:  # escaping, it would end the whole pytest session
        pytest.fail("train stopped on SIGINT although SIGINT was ignored")
    finally:
        signal.signal(signal.SIGINT, previous)
    assert len(calls) == 6 and history == expected


def test_checkpoint_from_another_device_is_refused_with_a_clear_error(tmp_path):
    target = make_target(TMSConfig(n_features=5, n_hidden=2, seed=4))
    cfg = shortened(preset("tms-5-2", "spd"), steps=4, batch_size=8).method
    train(SPD(target, cfg), target.sample, cfg.optim, 5, tmp_path, stop_at=2, progress="none")
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    torch.save({**state, "device": "cuda"}, tmp_path / "checkpoint.pt")
    with pytest.raises(DepassError, match="written on cuda and cannot resume exactly on cpu"):
        train(SPD(target, cfg), target.sample, cfg.optim, 5, tmp_path, progress="none")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_reproduce_on_cuda_resumes_exactly_and_evaluates_on_cpu(tmp_path):
    args = ["tms-5-2", "--method", "spd", "--steps", "20", "--target-steps", "50"]
    args += ["--batch-size", "128", "--no-progress", "--device", "cuda"]
    args += ["--figures", str(tmp_path / "fig")]
    straight = main(args + ["--runs", str(tmp_path / "a")])
    main(args + ["--runs", str(tmp_path / "b"), "--stop-at", "10"])
    resumed = main(args + ["--runs", str(tmp_path / "b")])
    assert resumed["machine"] == torch.cuda.get_device_name("cuda")
    assert resumed["mmcs"] == straight["mmcs"] and resumed["ci_l0"] == straight["ci_l0"]


def test_checkpoint_of_other_settings_is_refused_and_cli_runs_get_their_own_folders(tmp_path):
    target = make_target(TMSConfig(n_features=5, n_hidden=2, seed=4))
    cfg = shortened(preset("tms-5-2", "spd"), steps=4, batch_size=8).method
    train(SPD(target, cfg), target.sample, cfg.optim, 5, tmp_path, stop_at=2, progress="none")
    other = dataclasses.replace(cfg.optim, batch_size=16)
    with pytest.raises(DepassError, match="use another run folder"):
        train(SPD(target, cfg), target.sample, other, 5, tmp_path, progress="none")
    # the method's own settings too (a preset changed under an existing run folder)
    changed = dataclasses.replace(cfg, importance_coeff=2 * cfg.importance_coeff)
    with pytest.raises(DepassError, match=r"other settings \(importance_coeff=0.003; now "
                       r"importance_coeff=0.006\): use another run folder"):
        train(SPD(target, changed), target.sample, cfg.optim, 5, tmp_path, progress="none")
    # a checkpoint from before settings were recorded cannot be checked, so it is refused
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    torch.save({k: v for k, v in state.items() if k != "settings"}, tmp_path / "checkpoint.pt")
    with pytest.raises(DepassError, match="does not record the settings"):
        train(SPD(target, cfg), target.sample, cfg.optim, 5, tmp_path, progress="none")
    args = ["tms-5-2", "--method", "apd", "--steps", "3", "--target-steps", "5", "--no-progress"]
    args += ["--runs", str(tmp_path / "runs"), "--figures", str(tmp_path / "fig")]
    for batch in ("16", "32"):
        assert main(args + ["--batch-size", batch])["batch_size"] == int(batch)
    assert sorted(p.name for p in (tmp_path / "runs" / "tms-5-2").iterdir()) == [
        "target_seed0_steps5",
        "tms-5-2-apd_seed0_steps3_batch16",
        "tms-5-2-apd_seed0_steps3_batch32",
    ]


def test_decomposition_seed_reuses_the_target_and_gets_its_own_run_folder(tmp_path):
    torch.set_default_dtype(torch.float32)
    args = ["tms-5-2", "--method", "apd", "--steps", "4", "--target-steps", "5", "--batch-size",
            "64", "--runs", str(tmp_path), "--figures", str(tmp_path / "fig"), "--no-progress"]
    same = main(args)
    other = main(args + ["--decomposition-seed", "3"])
    assert (same["seed"], same["decomposition_seed"]) == (0, 0)
    assert (other["seed"], other["decomposition_seed"]) == (0, 3)
    assert other["target_loss"] == same["target_loss"]  # the same trained target
    assert other["wall_s"]["target"] < 1.0  # from the first run's checkpoint
    assert {p.name for p in (tmp_path / "tms-5-2").iterdir()} == {
        "target_seed0_steps5",
        "tms-5-2-apd_seed0_steps4_batch64",
        "tms-5-2-apd_seed0_dseed3_steps4_batch64",
    }


def test_finished_checkpoint_from_another_device_loads_without_training(tmp_path):
    """A checkpoint with no step left to train (finished, or at/past stop_at) loads on any
    device: its weights, no optimiser or random state, and the file is left as written."""
    target = make_target(TMSConfig(n_features=5, n_hidden=2, seed=4))
    cfg = shortened(preset("tms-5-2", "spd"), steps=4, batch_size=8).method
    trained = SPD(target, cfg)
    history = train(trained, target.sample, cfg.optim, 5, tmp_path, stop_at=2, progress="none")
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    torch.save({**state, "device": "cuda"}, tmp_path / "checkpoint.pt")
    written = (tmp_path / "checkpoint.pt").read_bytes()
    fresh = SPD(target, cfg)
    again = train(fresh, target.sample, cfg.optim, 5, tmp_path, stop_at=2, progress="none")
    assert again == history and (tmp_path / "checkpoint.pt").read_bytes() == written
    for name, value in trained.state_dict().items():
        torch.testing.assert_close(fresh.state_dict()[name], value, rtol=0, atol=0)
    with pytest.raises(DepassError, match="loads on any device"):  # steps 3-4 are left
        train(SPD(target, cfg), target.sample, cfg.optim, 5, tmp_path, progress="none")
