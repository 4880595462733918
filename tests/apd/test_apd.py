"""APD on hand-set tiny models: components sum to the weights, losses and attributions equal
their closed forms, and the gradient attribution matches the paper's parameter-space formula."""

import pytest
import torch
from torch.testing import assert_close

from tl_depass.apd.apd import APD, batch_topk
from tl_depass.apd.configs import APDConfig, OptimConfig, ResidualMLPConfig, TMSConfig
from tl_depass.apd.targets import make_target

OPTIM = OptimConfig(lr=1e-3, steps=10, batch_size=4)


def hand_set_apd(target, attribution="gradient", p=1.0) -> APD:
    """Two rank-one components that sum exactly to W = [[1, 0], [0, 2], [1, -1]]."""
    apd = APD(target, APDConfig(C=2, m=1, topk=1.0, optim=OPTIM, p=p, attribution=attribution))
    with torch.no_grad():
        apd.A["W"].copy_(torch.tensor([[[1.0], [0.0], [1.0]], [[0.0], [1.0], [-0.5]]]))
        apd.B["W"].copy_(torch.tensor([[[1.0, 0.0]], [[0.0, 2.0]]]))
    return apd


def test_components_sum_to_the_weights(linear_target):
    apd = hand_set_apd(linear_target)
    assert_close(apd.component_weights("W").sum(0), linear_target.W.detach())
    assert_close(apd.faithfulness_loss(), torch.tensor(0.0))


def test_all_ones_mask_reproduces_the_target_exactly(linear_target):
    apd = hand_set_apd(linear_target)
    x = torch.randn(7, 3, generator=torch.Generator().manual_seed(0))
    assert_close(apd(x, torch.ones(7, 2)), linear_target(x), rtol=0, atol=1e-14)


def test_all_ones_mask_on_tied_tms_with_identity_equals_summed_components():
    target = make_target(TMSConfig(n_features=5, n_hidden=2, hidden_identity="identity", seed=1))
    apd = APD(target, APDConfig(C=4, m=2, topk=1.0, optim=OPTIM, seed=1))
    x = target.sample(16, torch.Generator().manual_seed(1))
    w = apd.component_weights("W").sum(0).detach()
    hidden = apd.component_weights("hidden").sum(0).detach()
    expected = torch.relu(x @ w @ hidden @ w.T + target.b_final)
    assert_close(apd(x, torch.ones(16, 4)), expected)


def test_faithfulness_closed_form(linear_target):
    apd = hand_set_apd(linear_target)
    with torch.no_grad():
        apd.B["W"][1] = torch.tensor([[0.0, 1.0]])  # P_1 loses half: diff [[0,0],[0,1],[0,-.5]]
    assert_close(apd.faithfulness_loss(), torch.tensor(1.25 / 6))


def test_faithfulness_counts_tied_weights_twice():
    target = make_target(TMSConfig(n_features=5, n_hidden=2, seed=2))
    apd = APD(target, APDConfig(C=3, m=2, topk=1.0, optim=OPTIM, seed=2))
    diff = target.W.detach() - apd.component_weights("W").sum(0).detach()
    assert_close(apd.faithfulness_loss(), 2 * diff.pow(2).sum() / (2 * diff.numel()))


@pytest.mark.parametrize(
    ("p", "expected"), [(1.0, (2 * 2**0.5 + 1.25**0.5) / 12), (2.0, 5.25 / 12)]
)
def test_simplicity_closed_form(linear_target, p, expected):
    apd = hand_set_apd(linear_target, p=p)
    with torch.no_grad():
        apd.B["W"][1] = torch.tensor([[0.0, 1.0]])  # ‖A_0‖²‖B_0‖² = 2, ‖A_1‖²‖B_1‖² = 1.25
    mask = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    assert_close(apd.simplicity_loss(mask), torch.tensor(expected))


@pytest.mark.parametrize("attribution", ["gradient", "ablation"])
def test_attributions_on_a_linear_model_are_rms_component_outputs(linear_target, attribution):
    apd = hand_set_apd(linear_target, attribution=attribution)
    x = torch.randn(6, 3, generator=torch.Generator().manual_seed(3))
    expected = (
        torch.einsum("bi,cio->bco", x, apd.component_weights("W").detach()).pow(2).mean(-1).sqrt()
    )
    assert_close(apd.attributions(x), expected)


def test_activation_attribution_is_squared_component_output_norm(linear_target):
    apd = hand_set_apd(linear_target, attribution="activation")
    x = torch.randn(6, 3, generator=torch.Generator().manual_seed(4))
    expected = torch.einsum("bi,cio->bco", x, apd.component_weights("W").detach()).pow(2).sum(-1)
    assert_close(apd.attributions(x), expected)


def test_gradient_attribution_matches_parameter_space_definition():
    """A_c(x) = sqrt(mean_o (Σ_ij ∂f_o/∂W_ij · P_c,ij)²), with the tied W's gradient summing
    over both of its uses, computed one sample and one output at a time."""
    target = make_target(TMSConfig(n_features=5, n_hidden=2, hidden_identity="identity", seed=4))
    apd = APD(target, APDConfig(C=3, m=2, topk=1.0, optim=OPTIM, seed=4))
    x = torch.rand(4, 5, generator=torch.Generator().manual_seed(5))
    weights = {m: apd.component_weights(m).detach() for m in ("W", "hidden")}
    params = {"W": target.W, "hidden": target.hidden}
    expected = torch.zeros(4, 3)
    for b in range(4):
        per_output = []
        for o in range(5):
            tensors = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
            h = x[b] @ tensors["W"] @ tensors["hidden"]
            f = torch.relu(h @ tensors["W"].T + target.b_final.detach())[o]
            grads = torch.autograd.grad(f, list(tensors.values()))
            per_output.append(
                sum(
                    torch.einsum("ij,cij->c", g, weights[k])
                    for k, g in zip(tensors, grads, strict=True)
                )
            )
        expected[b] = torch.stack(per_output).pow(2).mean(0).sqrt()
    assert_close(apd.attributions(x), expected)


def test_batch_topk_keeps_the_largest_over_the_whole_batch():
    scores = torch.tensor([[0.9, 0.1, 0.8], [0.2, 0.3, 0.05]])
    mask = batch_topk(scores, topk=1.5)  # int(1.5 · 2) = 3 kept
    assert_close(mask, torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]))


def test_minimality_is_mse_of_the_topk_forward(linear_target):
    apd = hand_set_apd(linear_target)
    with torch.no_grad():
        apd.B["W"][1] = torch.tensor([[0.0, 1.0]])
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(6))
    weights = apd.component_weights("W").detach()
    per_component = torch.einsum("bi,cio->bco", x, weights)
    mask = batch_topk(per_component.pow(2).mean(-1).sqrt(), 1.0)
    expected = (
        ((per_component * mask[..., None]).sum(1) - x @ linear_target.W.detach()).pow(2).mean()
    )
    _, metrics = apd.training_loss(x, torch.Generator())
    assert metrics["minimality"] == pytest.approx(expected.item(), rel=1e-12)


def test_unit_norm_A_stays_on_the_sphere_after_a_step():
    target = make_target(TMSConfig(n_features=5, n_hidden=2, seed=6))
    apd = APD(target, APDConfig(C=3, m=2, topk=1.0, optim=OPTIM, a_norm="unit", seed=6))
    loss, _ = apd.training_loss(
        target.sample(32, torch.Generator().manual_seed(0)), torch.Generator()
    )
    loss.backward()
    apd.before_optimizer_step()
    a = apd.A["W"]
    assert_close((a.grad * a).sum(1), torch.zeros(3, 2), atol=1e-12, rtol=0)
    assert_close(a.norm(dim=1), torch.ones(3, 2))


def test_hidden_activation_reconstruction_with_every_component_active():
    """topk = C keeps every component, so the top-k forward uses Σ_c P_c in each matrix."""
    target = make_target(ResidualMLPConfig(n_features=6, d_embed=8, d_mlp=4, seed=7))
    cfg = APDConfig(C=3, m=None, topk=3.0, optim=OPTIM, act_recon_coeff=1.0, seed=7)
    apd = APD(target, cfg)
    x = target.sample(16, torch.Generator().manual_seed(8)) + 0.5  # dense inputs
    resid = x @ target.W_E
    w_in = apd.component_weights("layers.0.W_in").sum(0).detach()
    expected = (torch.relu(resid @ w_in) - torch.relu(resid @ target.layers__0__W_in)).pow(2).mean()
    _, metrics = apd.training_loss(x, torch.Generator())
    assert metrics["act_recon"] == pytest.approx(expected.item(), rel=1e-10)
