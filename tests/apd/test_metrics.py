"""Metrics on cases with known answers."""

import dataclasses

import pytest
import torch
from torch.testing import assert_close

from tl_depass.apd.configs import ResidualMLPConfig
from tl_depass.apd.metrics import (
    layer_contributions,
    layer_shares,
    mmcs_ml2r,
    neuron_contributions,
    permute_to_diagonal,
)
from tl_depass.apd.targets import make_target


def test_mmcs_ml2r_one_component_per_feature():
    weight = torch.randn(5, 2, generator=torch.Generator().manual_seed(0))
    components = torch.zeros(5, 5, 2)
    for j in range(5):
        components[j, j] = 0.5 * weight[j]
    match = mmcs_ml2r(weight, components)
    assert_close(match.cosine, torch.ones(5))
    assert_close(match.l2_ratio, torch.full((5,), 0.5))
    assert match.best.tolist() == [0, 1, 2, 3, 4]
    assert match.mmcs[1] < 1e-9


def test_mmcs_detects_a_rotated_feature():
    weight = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    components = torch.tensor([[[1.0, 1.0], [0.0, 1.0]]])  # feature 0 at 45 degrees
    match = mmcs_ml2r(weight, components)
    assert_close(match.cosine, torch.tensor([2**-0.5, 1.0]))
    assert_close(match.l2_ratio, torch.tensor([2**0.5, 1.0]))


def test_neuron_contributions_sum_to_the_mlp_path_on_one_hot_inputs():
    target = make_target(ResidualMLPConfig(n_features=6, d_embed=8, d_mlp=4, seed=3))
    w_in, w_out = target.layers__0__W_in.detach(), target.layers__0__W_out.detach()
    contributions = neuron_contributions(target, w_in, w_out)
    value = 0.75
    out = target(torch.eye(6) * value).detach()
    read = target.W_E @ w_in
    for i in range(6):
        via_mlp = out[i, i] - value  # the direct residual path gives value · ‖W_E[i]‖² = value
        expected = value * contributions[i][read[i] > 0].sum()
        assert_close(via_mlp, expected)


def test_layer_contributions_and_shares_locate_the_layer_a_matrix_set_uses():
    target = make_target(ResidualMLPConfig(n_features=6, d_embed=8, d_mlp=4, n_layers=2, seed=3))
    weights = {k: v.detach() for k, v in target.matrices().items()}
    both = layer_contributions(target, weights)
    assert both.shape == (6, 2, 4)
    for layer in range(2):
        w_in, w_out = weights[f"layers.{layer}.W_in"], weights[f"layers.{layer}.W_out"]
        assert_close(both[:, layer], neuron_contributions(target, w_in, w_out))
    assert_close(layer_shares(both).sum(-1), torch.ones(6))
    only_second = {k: v * 0 if k.startswith("layers.0.") else v for k, v in weights.items()}
    assert_close(layer_shares(layer_contributions(target, only_second)), torch.tensor([[0.0, 1.0]] * 6))
    assert_close(layer_shares(torch.zeros(3, 2, 4)), torch.zeros(3, 2))  # no contribution: 0, not NaN


def test_permute_to_diagonal_puts_each_features_column_first():
    ci = torch.tensor([[0.0, 0.1, 0.9, 0.0], [0.8, 0.0, 0.0, 0.1], [0.0, 0.7, 0.2, 0.0]])
    assert permute_to_diagonal(ci) == [2, 0, 1, 3]


def test_report_table_lists_every_run(tmp_path):
    from tl_depass.apd.experiments.summary import load_results, markdown_table

    row = {
        "experiment": "tms-5-2/spd",
        "seed": 1,
        "steps": 10,
        "batch_size": 8,
        "mmcs": [0.99, 0.01],
        "ml2r": [0.9, 0.1],
        "alive": {"W": 5},
        "ci_l0": {"W": 0.2},
        "target_loss": 1e-3,
        "wall_s": {"target": 6.0, "decomposition": 60.0},
    }
    for seed in (1, 0):
        (tmp_path / f"s{seed}").mkdir()
        (tmp_path / f"s{seed}" / "results.json").write_text(
            __import__("json").dumps({**row, "seed": seed})
        )
    table = markdown_table(load_results(tmp_path))
    lines = table.splitlines()
    assert (
        len(lines) == 4 and "| tms-5-2/spd | 0 |" in lines[2] and "| tms-5-2/spd | 1 |" in lines[3]
    )
    assert "0.9900 ± 0.0100" in lines[2] and "0.1 + 1.0 min" in lines[2]


def oracle_apd(n_layers: int, topk: float):
    """An APD of a residual MLP whose component 0 is the whole target (every matrix) and whose
    other components are zero: every mask that keeps component 0 reproduces the target exactly."""
    from tl_depass.apd.apd import APD
    from tl_depass.apd.configs import APDConfig, OptimConfig

    target = make_target(ResidualMLPConfig(n_features=6, d_embed=9, d_mlp=4, n_layers=n_layers,
                                           seed=3))
    apd = APD(target, APDConfig(C=3, m=None, topk=topk, optim=OptimConfig(lr=1e-3, steps=1,
                                                                            batch_size=48)))
    with torch.no_grad():
        for name, weight in target.matrices().items():
            key = name.replace(".", "__")
            apd.A[key].zero_()
            apd.B[key].zero_()
            d_in, d_out = weight.shape  # m = min(d_in, d_out): weight = weight @ I or I @ weight
            apd.A[key][0] = weight if d_in >= d_out else torch.eye(d_in)
            apd.B[key][0] = torch.eye(d_out) if d_in >= d_out else weight
    return target, apd


def alone_inputs(target, size: int, samples: int, seed: int = 0) -> list[torch.Tensor]:
    """By hand, the stream `feature_losses` draws: batches of `size` from the training
    distribution until every feature was alone in `samples` inputs."""
    g, batches, counts = torch.Generator().manual_seed(seed), [], torch.zeros(target.n_features)
    while counts.min() < samples:
        x = target.sample(size, g)
        batches.append(x)
        counts += ((x != 0) & ((x != 0).sum(-1, keepdim=True) == 1)).sum(0)
    return batches


def test_feature_losses_of_an_exact_decomposition_equal_the_targets():
    from tl_depass.apd.metrics import feature_losses

    for n_layers in (1, 2):
        target, apd = oracle_apd(n_layers, topk=1.0)
        losses = feature_losses(apd, samples=7, chunk=5)
        assert set(losses) == {"target", "apd_topk", "apd_top1"}
        assert losses["target"].shape == (6,) and (losses["target"] > 0).all()
        assert_close(losses["apd_top1"], losses["target"], rtol=1e-5, atol=1e-7)
        assert_close(losses["apd_topk"], losses["target"], rtol=1e-5, atol=1e-7)
        # the target's column, by hand for feature 2: the drawn inputs where it alone is active
        x = torch.cat(alone_inputs(target, 48, 7))
        x = x[((x != 0).sum(-1) == 1) & (x[:, 2] != 0)]
        by_hand = (target(x) - (x + torch.relu(x))).pow(2).mean()
        assert_close(losses["target"][2], by_hand)


def test_feature_losses_apply_the_batch_top_k_mask(monkeypatch):
    """The batch top-k mask is taken over whole batches of the training size; with a mask that
    keeps nothing, every input runs through the embedding alone (x W_E W_U), and each feature's
    top-k loss is that path's; top-1 still keeps component 0 everywhere."""
    from tl_depass.apd import metrics

    target, apd = oracle_apd(1, topk=1.0)
    shapes = []
    monkeypatch.setattr(metrics, "batch_topk", lambda a, k: shapes.append(a.shape) or torch.zeros_like(a))
    losses = metrics.feature_losses(apd, samples=8, chunk=16)
    batches = alone_inputs(target, 48, 8)
    assert shapes == [(48, 3)] * len(batches)
    x = torch.cat(batches)
    x = x[(x != 0).sum(-1) == 1]
    feature = (x != 0).int().argmax(-1)
    err = (x @ target.W_E @ target.W_U - (x + torch.relu(x))).pow(2).mean(-1)
    embedding_only = torch.stack([err[feature == f].mean() for f in range(6)])
    assert_close(losses["apd_topk"], embedding_only, rtol=1e-5, atol=1e-8)
    assert not torch.allclose(embedding_only, losses["target"])
    assert_close(losses["apd_top1"], losses["target"], rtol=1e-5, atol=1e-7)


def test_feature_losses_refuse_an_endless_draw():
    from tl_depass.apd.metrics import feature_losses

    target, apd = oracle_apd(1, topk=1.0)
    with pytest.raises(ValueError, match="lower `samples`"):
        feature_losses(apd, samples=10**7)
    with pytest.raises(ValueError, match="at least 1"):
        feature_losses(apd, samples=0)
    target.cfg = dataclasses.replace(target.cfg, feature_prob=1.0)  # never one feature alone
    with pytest.raises(ValueError, match="probability 0.0e"):
        feature_losses(apd, samples=1)
