"""APD on hand-set tiny models: components sum to the weights, losses and attributions equal
their closed forms, and the gradient attribution matches the paper's parameter-space formula."""

import pytest
import torch
from torch.testing import assert_close

from tl_depass.apd import contract
from tl_depass.apd.apd import APD, batch_topk
from tl_depass.apd.configs import APDConfig, OptimConfig, ResidualMLPConfig, TMSConfig
from tl_depass.apd.experiments.presets import preset
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


def test_xavier_init_has_the_reference_codes_fans():
    # The reference code's factors are [instances, C, d_in, m] parameters filled by
    # torch.nn.init.xavier_normal_, whose fans then count C (and the instances) too.
    target = make_target(TMSConfig(n_features=40, n_hidden=10, seed=0))
    C, m = 50, 11
    apd = APD(target, APDConfig(C=C, m=m, topk=1.0, optim=OPTIM, init="xavier"))
    for factor, shape in ((apd.A["W"], (1, C, 40, m)), (apd.B["W"], (1, C, m, 10))):
        fan_in, fan_out = torch.nn.init._calculate_fan_in_and_fan_out(torch.empty(shape))
        expected = (2 / (fan_in + fan_out)) ** 0.5
        assert factor.std().item() == pytest.approx(expected, rel=0.05)
        assert factor.mean().abs().item() < 0.05 * expected
    default = APD(target, APDConfig(C=C, m=m, topk=1.0, optim=OPTIM))
    ratio = default.component_weights("W").std() / apd.component_weights("W").std()
    assert 50 < ratio.item() < 300  # sqrt((C+1) m)/2 * sqrt((C+1) d_out)/2 = 133: near zero


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


# ---- the fast step equals the straightforward one --------------------------------------------
# `reference_*` is apd.py as it was before the step was made fast (batched autograd over the
# outputs, `[batch, C, d_out]` component outputs at every site, dense masked products): the
# factorised GEMM orders, the vmapped Jacobians and the sparse masked product must reproduce it.


def reference_linear_fns(apd, mask):
    def make(site):
        first, second = apd.factors(site)

        def fn(a):
            inner = torch.einsum("bi,cim->bcm", a, first) * mask[:, :, None]
            return torch.einsum("bcm,cmo->bo", inner, second)

        return fn

    return {site.name: make(site) for site in apd.target.sites}


def reference_site_outputs(apd, inputs):
    outs = {}
    for site in apd.target.sites:
        first, second = apd.factors(site)
        outs[site.name] = torch.einsum("bi,cim,cmo->bco", inputs[site.name], first, second)
    return outs


def reference_output_grads(apd, x):
    probes = {}

    def make(site):
        def fn(a):
            out = a @ apd.target.site_weight(site)
            probes[site.name] = torch.zeros_like(out, requires_grad=True)
            return out + probes[site.name]

        return fn

    with torch.enable_grad():
        run = apd.target.run(x, {s.name: make(s) for s in apd.target.sites})
        n_out = run.output.shape[-1]
        eye = torch.eye(n_out).to(x)[:, None, :].expand(n_out, *run.output.shape)
        names = [s.name for s in apd.target.sites]
        grads = torch.autograd.grad(
            run.output, [probes[n] for n in names], grad_outputs=eye, is_grads_batched=True
        )
    return {k: v.detach() for k, v in run.inputs.items()}, dict(zip(names, grads, strict=True))


@torch.no_grad()
def reference_attributions(apd, x):
    kind = apd.cfg.attribution
    if kind == "gradient":
        inputs, grads = reference_output_grads(apd, x)
        outs = reference_site_outputs(apd, inputs)
        total = sum(torch.einsum("obj,bcj->obc", grads[n], outs[n]) for n in outs)
        return total.pow(2).mean(0).sqrt()
    if kind == "activation":
        outs = reference_site_outputs(apd, apd.target.run(x).inputs)
        return sum(o.pow(2).sum(-1) for o in outs.values())
    ones = x.new_ones(x.shape[0], apd.cfg.C)
    full = apd.target.run(x, reference_linear_fns(apd, ones)).output
    scores = []
    for c in range(apd.cfg.C):
        ablated = ones.clone()
        ablated[:, c] = 0.0
        out = apd.target.run(x, reference_linear_fns(apd, ablated)).output
        scores.append((full - out).pow(2).mean(-1).sqrt())
    return torch.stack(scores, dim=-1)


def reference_training_loss(apd, x, attributions=reference_attributions):
    cfg = apd.cfg
    if cfg.a_norm == "unit":
        apd.normalise_A()
    with torch.no_grad():
        target_run = apd.target.run(x)
    mask = batch_topk(attributions(apd, x), cfg.topk)
    topk_run = apd.target.run(x, reference_linear_fns(apd, mask))
    total, count = 0.0, 0
    for site in apd.target.sites:
        first, second = apd.factors(site)
        diff = apd.target.site_weight(site) - torch.einsum("cim,cmo->io", first, second)
        total, count = total + diff.pow(2).sum(), count + diff.numel()
    faith = total / count
    minimality = (topk_run.output - target_run.output).pow(2).mean()
    simplicity = apd.simplicity_loss(mask)
    loss = cfg.faithfulness_coeff * faith + cfg.minimality_coeff * minimality
    loss = loss + cfg.simplicity_coeff * simplicity
    metrics = {"faithfulness": faith, "minimality": minimality, "simplicity": simplicity}
    if cfg.act_recon_coeff > 0:
        act = sum(
            (topk_run.hidden[k] - target_run.hidden[k]).pow(2).mean() for k in target_run.hidden
        ) / len(target_run.hidden)
        loss = loss + cfg.act_recon_coeff * act
        metrics["act_recon"] = act
    metrics["loss"] = loss
    return loss, {k: v.item() for k, v in metrics.items()}


SMALL_TARGETS = {
    "resid-1": ResidualMLPConfig(n_features=6, d_embed=9, d_mlp=4, feature_prob=0.5, seed=11),
    "resid-2": ResidualMLPConfig(
        n_features=6, d_embed=9, d_mlp=3, n_layers=2, feature_prob=0.5, seed=12
    ),
    "resid-3": ResidualMLPConfig(
        n_features=5, d_embed=8, d_mlp=3, n_layers=3, feature_prob=0.5, seed=14
    ),
    "tms-id": TMSConfig(n_features=7, n_hidden=3, hidden_identity="identity", seed=13),
}


def small_apd(name, attribution="gradient", m=None, a_norm="free"):
    target = make_target(SMALL_TARGETS[name])
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a trained-looking target: every bias and weight non-zero
        for param in target.parameters():
            param.add_(0.3 * torch.randn(param.shape, generator=gen))
    act_recon = 1.0 if name.startswith("resid") else 0.0
    cfg = APDConfig(
        C=5, m=m, topk=1.5, optim=OPTIM, attribution=attribution, act_recon_coeff=act_recon,
        simplicity_coeff=0.7, p=0.9, a_norm=a_norm, seed=3,
    )  # fmt: skip
    return APD(target, cfg)


def loss_and_grads(apd, loss_fn, x):
    apd.zero_grad(set_to_none=True)
    loss, metrics = loss_fn(apd, x)
    loss.backward()
    grads = {f"{kind}.{k}": p.grad.clone() for kind in ("A", "B") for k, p in getattr(apd, kind).items()}
    return metrics, grads


@pytest.mark.parametrize("name", sorted(SMALL_TARGETS))
@pytest.mark.parametrize("attribution", ["gradient", "activation", "ablation"])
def test_attributions_equal_the_reference(name, attribution):
    apd = small_apd(name, attribution, m=2 if name == "tms-id" else None)
    x = apd.target.sample(40, torch.Generator().manual_seed(1))
    assert_close(
        apd.attributions(x), reference_attributions(apd, x), rtol=1e-10, atol=1e-12,
        msg=lambda m: f"{attribution} attributions on {name}: {m}",
    )  # fmt: skip


@pytest.mark.parametrize("name", sorted(SMALL_TARGETS))
@pytest.mark.parametrize("masked", ["sparse", "dense"])
def test_training_loss_and_gradients_equal_the_reference(name, masked, monkeypatch):
    """Both masked-product paths (sparse: per active pair; dense: all pairs) give the
    reference's losses and parameter gradients."""
    monkeypatch.setattr(contract, "_SPARSE_MAX_FRACTION", 1e30 if masked == "sparse" else 0.0)
    apd = small_apd(name, a_norm="unit" if name == "resid-1" else "free")
    x = apd.target.sample(40, torch.Generator().manual_seed(2))
    metrics, grads = loss_and_grads(apd, lambda a, x: a.training_loss(x, torch.Generator()), x)
    ref_metrics, ref_grads = loss_and_grads(apd, reference_training_loss, x)
    assert metrics == pytest.approx(ref_metrics, rel=1e-10)
    for key, grad in grads.items():
        assert_close(grad, ref_grads[key], rtol=1e-10, atol=1e-13, msg=lambda m, k=key: f"{k}: {m}")


@pytest.mark.parametrize(("d_in", "m", "d_out", "n_out"), [(8, 4, 4, 3), (8, 2, 4, 6), (3, 3, 9, 2)])
@pytest.mark.parametrize("grad_kind", ["per_sample", "batch_constant"])
def test_contraction_orders_agree(d_in, m, d_out, n_out, grad_kind, monkeypatch):
    """Every order `contract` may choose (through P_c or the rank-m inner product; batch chunks)
    equals the three-factor einsum."""
    monkeypatch.setattr(contract, "_CHUNK_ELEMENTS", 3 * 5 * d_out)  # chunks of 3 samples
    gen = torch.Generator().manual_seed(d_in * m)
    a, first, second = (torch.randn(*s, generator=gen) for s in [(16, d_in), (5, d_in, m), (5, m, d_out)])
    grad = torch.randn(16, n_out, d_out, generator=gen)
    if grad_kind == "batch_constant":
        grad = grad[:1].expand(16, n_out, d_out)
    outs = torch.einsum("bi,cim,cmo->bco", a, first, second)
    assert_close(contract.component_outputs(a, first, second), outs, rtol=1e-12, atol=1e-12)
    expected = torch.einsum("boj,bcj->bco", grad, outs)
    assert_close(
        contract.output_grad_contraction(a, first, second, grad), expected, rtol=1e-12, atol=1e-12
    )
    earlier = torch.randn(16, 5, n_out, generator=gen)  # another site's share, added to in place
    assert_close(
        contract.output_grad_contraction(a, first, second, grad, out=earlier.clone()),
        earlier + expected, rtol=1e-12, atol=1e-12,
    )  # fmt: skip


def test_batch_independent_output_jacobian_is_computed_once():
    """The residual MLP's output is linear in `W_out`'s output: its Jacobian comes back expanded
    over the batch (stride 0), so no `[batch, n_out, d_embed]` tensor is built."""
    apd = small_apd("resid-1")
    x = apd.target.sample(8, torch.Generator().manual_seed(3))
    _, grads = apd._target_output_grads(x)
    assert grads["layers.0.W_out"].stride(0) == 0
    assert grads["layers.0.W_in"].stride(0) != 0
    _, ref_grads = reference_output_grads(apd, x)
    for name, grad in grads.items():
        assert_close(grad, ref_grads[name].transpose(0, 1), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", ["resid-1", "resid-2", "resid-3"])
def test_residual_mlp_jvps_equal_the_output_jacobian_contraction(name):
    """`ResidualMLP.component_jvps` (no Jacobians built) equals contracting the per-sample
    output Jacobians with the component outputs, the path every other target takes. Neuron 0
    of every layer has a zero `W_in` column, so its pre-activation sits at ReLU's kink for every
    input, where both must take the derivative as 0 (the components' share there is not 0)."""
    apd = small_apd(name)
    with torch.no_grad():
        for layer in range(apd.target.cfg.n_layers):
            getattr(apd.target, f"layers__{layer}__W_in")[:, 0] = 0.0
    x = apd.target.sample(30, torch.Generator().manual_seed(4))
    with torch.no_grad():
        inputs, grads = apd._target_output_grads(x)
        expected = sum(
            contract.output_grad_contraction(inputs[s.name], *apd.factors(s), grads[s.name])
            for s in apd.target.sites
        )
        factors = {s.name: apd.factors(s) for s in apd.target.sites}
        got = apd.target.component_jvps(x, factors)
    assert_close(got, expected, rtol=1e-10, atol=1e-13, msg=lambda m: f"{name}: {m}")


def test_full_size_resid_mlp_step_equals_the_reference_in_float32(monkeypatch):
    """The resid-mlp-1 preset's shapes (batch 2048, C 130, d_embed 1000) in float32, one step.
    Both losses use the reference's attributions, so float32 rounding cannot flip a top-k choice
    between them."""
    torch.set_default_dtype(torch.float32)
    config = preset("resid-mlp-1", "apd")
    apd = APD(make_target(config.target), config.method)
    x = apd.target.sample(config.method.optim.batch_size, torch.Generator().manual_seed(0))
    apd.normalise_A()
    reference = reference_attributions(apd, x)
    scale = reference.abs().max().item()
    assert_close(apd.attributions(x), reference, rtol=1e-4, atol=1e-5 * scale)
    monkeypatch.setattr(apd, "attributions", lambda x: reference)
    metrics, grads = loss_and_grads(apd, lambda a, x: a.training_loss(x, torch.Generator()), x)
    ref_metrics, ref_grads = loss_and_grads(
        apd, lambda a, x: reference_training_loss(a, x, lambda *_: reference), x
    )
    assert metrics == pytest.approx(ref_metrics, rel=1e-4)
    for key, grad in grads.items():
        scale = ref_grads[key].abs().max().item()
        assert_close(grad, ref_grads[key], rtol=1e-4, atol=1e-5 * scale, msg=lambda m, k=key: f"{k}: {m}")


@pytest.mark.parametrize("masked", ["sparse", "dense"])
@pytest.mark.parametrize("pattern", ["scattered", "one_component_everywhere", "all_zero", "all_one"])
def test_masked_product_paths_agree(masked, pattern, monkeypatch):
    """Both paths of `masked_product`, also when one component is on for every sample (so it
    spans several tiles) or none is, equal the einsum and give its gradients."""
    monkeypatch.setattr(contract, "_SPARSE_MAX_FRACTION", 1e30 if masked == "sparse" else 0.0)
    gen = torch.Generator().manual_seed(5)
    a, first, second = (
        torch.randn(*s, generator=gen, requires_grad=True) for s in [(12, 6), (4, 6, 3), (4, 3, 5)]
    )
    mask = (torch.rand(12, 4, generator=gen) < 0.2) * torch.rand(12, 4, generator=gen)
    if pattern == "one_component_everywhere":
        mask[:, 2] = 1.0
    mask = {"all_zero": torch.zeros(12, 4), "all_one": torch.ones(12, 4)}.get(pattern, mask)
    out = contract.masked_product(a, first, second, mask)
    expected = torch.einsum("bi,cim,cmo,bc->bo", a, first, second, mask)
    assert_close(out, expected, rtol=1e-12, atol=1e-14)
    cotangent = torch.randn(12, 5, generator=gen)
    grads = torch.autograd.grad((out * cotangent).sum(), [a, first, second], allow_unused=True)
    ref_grads = torch.autograd.grad((expected * cotangent).sum(), [a, first, second])
    for name, grad, ref in zip(["a", "first", "second"], grads, ref_grads, strict=True):
        grad = torch.zeros_like(ref) if grad is None else grad
        assert_close(grad, ref, rtol=1e-12, atol=1e-14, msg=lambda m, n=name: f"d/d{n}: {m}")
