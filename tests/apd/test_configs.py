"""Bad configurations fail at construction with a message that names the field."""

import dataclasses

import pytest

from tl_depass.apd.apd import APD
from tl_depass.apd.configs import (
    APDConfig,
    ConfigError,
    ExperimentConfig,
    OptimConfig,
    ResidualMLPConfig,
    SPDConfig,
    TMSConfig,
)
from tl_depass.apd.experiments.presets import PRESETS, overridden, preset
from tl_depass.apd.targets import make_target

OPTIM = OptimConfig(lr=1e-3, steps=10, batch_size=8)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: OptimConfig(lr=0.0, steps=10, batch_size=8), "lr"),
        (lambda: OptimConfig(lr=1e-3, steps=0, batch_size=8), "steps"),
        (lambda: OptimConfig(lr=1e-3, steps=10, batch_size=8, warmup_frac=1.0), "warmup_frac"),
        (lambda: OptimConfig(lr=1e-3, steps=10, batch_size=8, schedule="step"), "schedule"),
        (lambda: TMSConfig(n_features=0, n_hidden=2), "n_features"),
        (lambda: TMSConfig(n_features=5, n_hidden=2, hidden_identity="yes"), "hidden_identity"),
        (lambda: TMSConfig(n_features=5, n_hidden=2, feature_prob=0.0), "feature_prob"),
        (lambda: ResidualMLPConfig(d_mlp=0), "d_mlp"),
        (lambda: APDConfig(C=0, m=1, topk=1.0, optim=OPTIM), "C"),
        (lambda: APDConfig(C=5, m=0, topk=1.0, optim=OPTIM), "m"),
        (lambda: APDConfig(C=5, m=1, topk=6, optim=OPTIM), "topk"),
        (lambda: APDConfig(C=5, m=1, topk=0.1, optim=OPTIM), "keeps no component"),
        (lambda: APDConfig(C=5, m=1, topk=1.0, optim=OPTIM, p=0), "p"),
        (lambda: APDConfig(C=5, m=1, topk=1.0, optim=OPTIM, attribution="saliency"), "attribution"),
        (lambda: APDConfig(C=5, m=1, topk=1.0, optim=OPTIM, init="zeros"), "init"),
        (
            lambda: APDConfig(C=5, m=1, topk=1.0, optim=OPTIM, simplicity_coeff=-1),
            "simplicity_coeff",
        ),
        (lambda: SPDConfig(C=0, optim=OPTIM), "C"),
        (lambda: SPDConfig(C=4, optim=OPTIM, importance_coeff=-1), "importance_coeff"),
        (lambda: SPDConfig(C=4, optim=OPTIM, delta="yes"), "delta"),
        (
            lambda: ExperimentConfig(
                "x", TMSConfig(n_features=5, n_hidden=2), APDConfig(C=5, m=4, topk=1.0, optim=OPTIM)
            ),
            "rank m=4",
        ),
        (lambda: preset("tms-7-3", "spd"), "No preset"),
    ],
)
def test_bad_config_raises_clear_error(build, message):
    # A value outside a Literal is caught by our own check, or first by the runtime type
    # checker when the jaxtyping import hook is active (as under this test suite); both name it.
    with pytest.raises((ConfigError, TypeError), match=message):
        build()


def test_act_recon_without_hidden_activations_is_rejected():
    target = make_target(TMSConfig(n_features=5, n_hidden=2))
    cfg = APDConfig(C=5, m=3, topk=1.0, optim=OPTIM, act_recon_coeff=1.0)
    with pytest.raises(ConfigError, match="no hidden MLP activations"):
        APD(target, cfg)


def test_configs_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        OPTIM.lr = 1.0


def test_presets_carry_the_papers_values():
    apd = preset("tms-5-2", "apd").method
    assert (apd.C, apd.m, apd.topk, apd.simplicity_coeff, apd.optim.lr) == (5, 3, 0.211, 0.7, 3e-2)
    spd = preset("tms-40-10", "spd").method
    assert (spd.C, spd.importance_coeff, spd.p, spd.optim.batch_size) == (200, 1e-4, 2.0, 4096)
    assert preset("tms-5-2-id", "spd").target.hidden_identity == "identity"
    assert preset("resid-mlp-1", "apd").method.a_norm == "unit"
    assert {preset(e, "apd").method.init for e in ("tms-5-2", "tms-40-10", "tms-40-10-ref")} == {
        "xavier"}
    assert all(key.split("/")[1] in ("apd", "spd") for key in PRESETS)


def test_overridden_changes_method_settings_and_names_them():
    base = preset("tms-5-2", "apd")
    config, tag = overridden(base, ["simplicity_coeff=0.5", "optim.warmup_frac=0.2"])
    assert (config.method.simplicity_coeff, config.method.optim.warmup_frac) == (0.5, 0.2)
    assert config.method.optim.lr == base.method.optim.lr and config.target == base.target
    assert tag == "_simplicity_coeff0.5_warmup_frac0.2"
    assert overridden(base, []) == (base, "")
    for bad in ["simplicity_coeff", "nonsense=1", "seed=3", "optim.nonsense=1"]:
        with pytest.raises(ConfigError, match="expected KEY=VALUE"):
            overridden(base, [bad])
    with pytest.raises(ConfigError, match="topk"):
        overridden(base, ["topk=0"])  # the config's own validation
