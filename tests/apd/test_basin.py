"""The ground-truth decomposition of a TMS target (tl_depass/apd/experiments/basin.py)."""

import dataclasses
import re

import pytest
import torch
from torch.testing import assert_close

from tl_depass.apd.configs import ConfigError, TMSConfig
from tl_depass.apd.experiments.basin import at_ground_truth, loss_terms, main
from tl_depass.apd.experiments.presets import preset, shortened
from tl_depass.apd.metrics import component_weights, mmcs_ml2r
from tl_depass.apd.targets import make_target


@pytest.fixture
def target():
    return make_target(TMSConfig(n_features=5, n_hidden=2, seed=3)).double()


def config(**changes):
    cfg = shortened(preset("tms-5-2", "apd"), steps=10, batch_size=64).method
    return dataclasses.replace(cfg, **changes)


@pytest.mark.parametrize("scale", [1.0, 0.9])
def test_each_feature_in_its_own_component(target, scale):
    apd = at_ground_truth(target, config(C=7), scale)  # 2 spare components
    weights = component_weights(apd, "W")
    rows = weights[torch.arange(5), torch.arange(5)]  # component c's row c
    assert_close(rows, scale * target.W, rtol=1e-12, atol=1e-12)
    off = weights.clone()
    off[torch.arange(5), torch.arange(5)] = 0.0
    assert off[:5].abs().max() == 0  # nothing else in the features' components
    match = mmcs_ml2r(target.W, weights)
    assert match.best.tolist() == list(range(5))
    assert_close(match.l2_ratio, torch.full((5,), scale), rtol=1e-10, atol=0)  # eps 1e-12 in it
    assert 0 < weights[5:].abs().max() < 0.2  # the spares: a tenth of their initialisation


def test_with_every_component_active_the_ground_truth_is_the_target(target):
    """top-k = C and no spares: the masked model is the target, so minimality is 0, and so is
    faithfulness; a smaller scale is unfaithful and no longer the target."""
    batches = [target.sample(64, torch.Generator().manual_seed(0))]
    exact = loss_terms(at_ground_truth(target, config(topk=5.0)), batches)
    assert exact["faithfulness"] == 0 and exact["minimality"] < 1e-28
    shrunk = loss_terms(at_ground_truth(target, config(topk=5.0), 0.9), batches)
    assert shrunk["faithfulness"] > 1e-3 and shrunk["minimality"] > 1e-4


def test_targets_it_cannot_build(target):
    with pytest.raises(ConfigError, match="cannot hold 5 features"):
        at_ground_truth(target, config(C=4))
    with_identity = make_target(TMSConfig(n_features=5, n_hidden=2, hidden_identity="identity"))
    with pytest.raises(ConfigError, match="without a hidden identity"):
        at_ground_truth(with_identity.double(), config())


def test_command_prints_the_table_and_a_run_from_the_ground_truth(tmp_path, capsys):
    assert main(["tms-5-2", "--target-steps", "20", "--steps", "4", "--every", "2",
                 "--runs", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"\| ground truth × 1.0 \| [0-9.]+ \| 0.0e\+00 \|", out)
    assert "from the ground truth, step 4" in out
    assert (tmp_path / "tms-5-2" / "target_seed0_steps20" / "checkpoint.pt").exists()
