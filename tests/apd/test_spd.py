"""SPD on hand-set tiny models: sigmoids, exact all-ones reconstruction, closed-form losses."""

import pytest
import torch
from torch.testing import assert_close

from tl_depass.apd.configs import OptimConfig, SPDConfig, TMSConfig
from tl_depass.apd.spd import SPD, lower_leaky_hard_sigmoid, upper_leaky_hard_sigmoid
from tl_depass.apd.targets import make_target

OPTIM = OptimConfig(lr=1e-3, steps=10, batch_size=4)


def test_leaky_hard_sigmoids():
    z = torch.tensor([-1.0, 0.0, 0.5, 1.0, 2.0])
    assert_close(lower_leaky_hard_sigmoid(z), torch.tensor([-0.01, 0.0, 0.5, 1.0, 1.0]))
    assert_close(upper_leaky_hard_sigmoid(z), torch.tensor([0.0, 0.0, 0.5, 1.0, 1.01]))


def svd_spd(target, C: int) -> SPD:
    """Subcomponents set to the SVD's rank-one pieces of W (zero beyond the rank)."""
    spd = SPD(target, SPDConfig(C=C, optim=OPTIM))
    u, s, vh = torch.linalg.svd(target.W.detach(), full_matrices=False)
    with torch.no_grad():
        spd.V["W"].zero_()
        spd.U["W"].zero_()
        spd.V["W"][:, : len(s)] = u * s
        spd.U["W"][: len(s)] = vh
    return spd


def constant_ci(spd: SPD, gamma: list[float]) -> None:
    """Make every causal-importance MLP output the constant γ (first layers zeroed)."""
    with torch.no_grad():
        for name, param in spd.ci.items():
            param.zero_()
            if name.endswith("__b2"):
                param.copy_(torch.tensor(gamma))


def test_subcomponents_sum_to_the_weights(linear_target):
    spd = svd_spd(linear_target, C=3)
    assert_close(spd.subcomponent_weights("W").sum(0), linear_target.W.detach())
    assert_close(spd.faithfulness_loss(), torch.tensor(0.0), atol=1e-14, rtol=0)


def test_all_ones_mask_reproduces_the_target(linear_target):
    spd = svd_spd(linear_target, C=3)
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(0))
    assert_close(spd(x, {"W": torch.ones(5, 3)}), linear_target(x))


@pytest.mark.parametrize("hidden_identity", ["none", "identity"])
def test_all_ones_mask_with_delta_is_exactly_the_target(hidden_identity):
    """With the delta component, an untrained SPD with all masks 1 *is* the target."""
    target = make_target(
        TMSConfig(n_features=5, n_hidden=2, hidden_identity=hidden_identity, seed=1)
    )
    spd = SPD(target, SPDConfig(C=7, optim=OPTIM, delta="masked", seed=1))
    x = target.sample(32, torch.Generator().manual_seed(2))
    masks = {s.name: torch.ones(32, 7) for s in target.sites}
    deltas = {s.name: torch.ones(32) for s in target.sites}
    out = target.run(x, spd.linear_fns(masks, deltas)).output
    assert_close(out, target(x), rtol=0, atol=1e-12)


def test_tied_decoder_uses_the_transposed_subcomponents():
    target = make_target(TMSConfig(n_features=5, n_hidden=2, seed=3))
    spd = SPD(target, SPDConfig(C=4, optim=OPTIM, seed=3))
    decoder = next(s for s in target.sites if s.name == "W_T")
    v, u = spd.factors(decoder)
    assert_close(v @ u, spd.subcomponent_weights("W").sum(0).T)


@pytest.mark.parametrize(("p", "expected"), [(1.0, 0.0 + 0.5 + 1.005), (2.0, 0.25 + 1.005**2)])
def test_importance_minimality_closed_form(linear_target, p, expected):
    spd = SPD(linear_target, SPDConfig(C=3, optim=OPTIM, p=p))
    constant_ci(spd, [-0.5, 0.5, 1.5])  # σ_upper: 0, 0.5, 1.005
    pre = spd.ci_pre({"W": torch.randn(6, 3)})
    assert_close(spd.importance_minimality_loss(pre), torch.tensor(expected))


def test_stochastic_losses_closed_form(linear_target):
    """Masks g + (1 − g)·r with known g; the losses replayed by hand from the same generator."""
    spd = svd_spd(linear_target, C=3)
    constant_ci(spd, [-1.0, 0.5, 2.0])  # σ_lower: -0.01, 0.5, 1
    g = torch.tensor([-0.01, 0.5, 1.0])
    x = torch.randn(8, 3, generator=torch.Generator().manual_seed(4))
    _, metrics = spd.training_loss(x, torch.Generator().manual_seed(5))
    replay = torch.Generator().manual_seed(5)
    v, u = spd.V["W"].detach(), spd.U["W"].detach()
    target = x @ linear_target.W.detach()
    for key in ("stochastic_recon", "layerwise_recon"):  # drawn in this order, one site
        mask = g + (1 - g) * torch.rand(8, 3, generator=replay)
        expected = (((x @ v) * mask) @ u - target).pow(2).mean()
        assert metrics[key] == pytest.approx(expected.item(), rel=1e-12)
    assert metrics["faithfulness"] == pytest.approx(0.0, abs=1e-14)


def test_causal_importance_reads_the_projection_on_each_subcomponent(linear_target):
    """γ_c depends on x only through V_c · x: inputs orthogonal to V_c give the same CI."""
    spd = SPD(linear_target, SPDConfig(C=2, optim=OPTIM, seed=5))
    v0 = spd.V["W"][:, 0].detach()
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(6))
    orthogonal = torch.randn(4, 3, generator=torch.Generator().manual_seed(7))
    orthogonal = orthogonal - (orthogonal @ v0)[:, None] * v0 / v0.dot(v0)
    ci_a = spd.causal_importances(x)["W"][:, 0]
    ci_b = spd.causal_importances(x + orthogonal)["W"][:, 0]
    assert_close(ci_a, ci_b)
