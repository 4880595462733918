"""Metrics on cases with known answers."""

import torch
from torch.testing import assert_close

from tl_depass.apd.configs import ResidualMLPConfig
from tl_depass.apd.metrics import mmcs_ml2r, neuron_contributions, permute_to_diagonal
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


def test_permute_to_diagonal_puts_each_features_column_first():
    ci = torch.tensor([[0.0, 0.1, 0.9, 0.0], [0.8, 0.0, 0.0, 0.1], [0.0, 0.7, 0.2, 0.0]])
    assert permute_to_diagonal(ci) == [2, 0, 1, 3]
