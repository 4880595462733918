"""The baselines DePass is evaluated against: each one checked against an independent computation
on tiny float64 models with every parameter randomised."""

import pytest
import torch
from tiny import random_tokens

from tl_depass import DepassError, Heads, Neurons, compare
from tl_depass.evaluate import baselines as B

ANSWERS = torch.tensor([3, 11, 17])
WRONG = torch.tensor([5, 2, 9])


@pytest.fixture(scope="module")
def tokens(model):
    return random_tokens(model, batch=3, pos=8, bos=0)


def no_hooks(model) -> bool:
    return all(not h._forward_hooks and not h._backward_hooks for h in model.hook_dict.values())


def logprob_with_embedding(model, tokens, x):
    logits = model.run_with_hooks(tokens, fwd_hooks=[(B.EMBED_HOOK, lambda act, hook: x)])
    return B.answer_logprob(logits, ANSWERS)


def test_integrated_gradients_completeness(model, tokens):
    """Σ_pos IG = f(x) − f(0) up to the quadrature error, which shrinks with more steps."""
    x = B.embedding(model, tokens)
    with torch.no_grad():
        gap = B.answer_logprob(model(tokens), ANSWERS) - logprob_with_embedding(model, tokens, 0 * x)
    for steps, rtol in [(100, 2e-2), (400, 2e-3)]:
        scores, delta = B.integrated_gradients_with_delta(model, tokens, ANSWERS, steps=steps)
        assert scores.shape == tokens.shape
        torch.testing.assert_close(scores.sum(1), gap, rtol=0, atol=rtol * gap.abs().max().item())
        torch.testing.assert_close(delta, scores.sum(1) - gap, rtol=0, atol=1e-8)
    assert no_hooks(model)


def test_occlusion_is_a_deletion(model, tokens):
    scores = B.occlusion(model, tokens, ANSWERS, chunk=3)
    with torch.no_grad():
        base = B.answer_logprob(model(tokens), ANSWERS)
        for p in [0, 4, 6]:
            shorter = torch.cat([tokens[:, :p], tokens[:, p + 1:]], 1)
            torch.testing.assert_close(scores[:, p], base - B.answer_logprob(model(shorter), ANSWERS))
    assert scores[:, -1].isnan().all() and not scores[:, :-1].isnan().any()


def test_input_x_gradient_matches_finite_differences(model, tokens):
    x = B.embedding(model, tokens)
    _, grad = B.embedding_gradient(model, tokens, ANSWERS)
    eps = 1e-6
    for b, p, d in [(0, 2, 5), (1, 7, 0), (2, 0, 15)]:
        step = torch.zeros_like(x)
        step[b, p, d] = eps
        with torch.no_grad():
            fd = (logprob_with_embedding(model, tokens, x + step)
                  - logprob_with_embedding(model, tokens, x - step))[b] / (2 * eps)
        torch.testing.assert_close(grad[b, p, d], fd, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(B.input_x_gradient(model, tokens, ANSWERS), (x * grad).sum(-1))
    torch.testing.assert_close(B.gradient_norm(model, tokens, ANSWERS), grad.norm(dim=-1))


def test_attention_scores(model, tokens):
    _, cache = model.run_with_cache(tokens)
    patterns = torch.stack([cache["pattern", layer] for layer in range(model.cfg.n_layers)])
    torch.testing.assert_close(B.attention_mean(model, tokens), patterns[:, :, :, -1].mean((0, 2)))
    torch.testing.assert_close(B.attention_last_layer(model, tokens), patterns[-1, :, :, -1].mean(1))
    rollout = B.rollout_matrix(model, tokens)
    torch.testing.assert_close(rollout.sum(-1), torch.ones(3, 8, dtype=torch.float64))
    # by hand for two layers: row-normalised (A + I) / 2 per layer, later layer on the left
    eye = torch.eye(8, dtype=torch.float64)
    mix = [0.5 * patterns[layer].mean(1) + 0.5 * eye for layer in range(2)]
    mix = [m / m.sum(-1, keepdim=True) for m in mix]
    torch.testing.assert_close(rollout, mix[1] @ mix[0])
    torch.testing.assert_close(B.attention_rollout(model, tokens), rollout[:, -1])
    assert (torch.triu(rollout, 1) == 0).all()  # causal: no position reads a later one


def unit_index(name: str, unit: int) -> tuple:
    """One head of z ([batch pos head d_head]) or one neuron of an MLP activation."""
    return (Ellipsis, unit, slice(None)) if name.endswith("hook_z") else (Ellipsis, unit)


def finite_difference_effect(model, tokens, metric, name, unit, ref, eps=1e-5):
    """−d/dε metric(a + ε (a_ref − a)) at ε = 0 for one unit, by central differences."""
    at = unit_index(name, unit)

    def run(e):
        def hook(a, hook):
            step = torch.zeros_like(a)
            step[at] = ((ref if ref is not None else 0) - a)[at]
            return a + e * step
        with torch.no_grad():
            return metric(model.run_with_hooks(tokens, fwd_hooks=[(name, hook)]))
    return -(run(eps) - run(-eps)) / (2 * eps)


@pytest.mark.parametrize("corrupt", [False, True])
def test_attribution_patching_is_the_first_order_term(model, tokens, corrupt):
    corrupted = random_tokens(model, batch=3, pos=8, seed=5, bos=0) if corrupt else None
    metric = B.logit_diff_metric(ANSWERS, WRONG)
    heads = B.attribution_patching(model, tokens, metric, Heads(), corrupted=corrupted, absolute=False)
    neurons = B.attribution_patching(model, tokens, metric, Neurons(1), corrupted=corrupted,
                                     absolute=False)
    assert heads.shape == (2, 4) and neurons.shape == (24,)
    refs = {}
    if corrupt:
        _, cache = model.run_with_cache(corrupted)
        refs = {n: cache[n] for n in ["blocks.0.attn.hook_z", "blocks.1.attn.hook_z",
                                      "blocks.1.mlp.hook_post"]}
    for layer, head in [(0, 1), (1, 3)]:
        name = f"blocks.{layer}.attn.hook_z"
        fd = finite_difference_effect(model, tokens, metric, name, head, refs.get(name))
        torch.testing.assert_close(heads[layer, head], fd, rtol=1e-6, atol=1e-9)
    for neuron in [0, 13]:
        name = "blocks.1.mlp.hook_post"
        fd = finite_difference_effect(model, tokens, metric, name, neuron, refs.get(name))
        torch.testing.assert_close(neurons[neuron], fd, rtol=1e-6, atol=1e-9)
    absolute = B.attribution_patching(model, tokens, metric, Heads(), corrupted=corrupted)
    torch.testing.assert_close(absolute, heads.abs())
    assert no_hooks(model)


def test_activation_patching_is_exact(model, tokens):
    metric = B.logit_diff_metric(ANSWERS, WRONG)
    # zero-ablation: the same numbers as tl_depass.evaluate.compare's plain zero ablation
    torch.testing.assert_close(B.activation_patching(model, tokens, metric, chunk=3),
                               compare.plain_ablation(model, tokens, metric))
    corrupted = random_tokens(model, batch=3, pos=8, seed=5, bos=0)
    _, cache = model.run_with_cache(corrupted)
    heads = B.activation_patching(model, tokens, metric, corrupted=corrupted)
    neurons = B.activation_patching(model, tokens, metric, Neurons(0), corrupted=corrupted, chunk=5)
    base = metric(model(tokens))
    for name, unit, got in [("blocks.1.attn.hook_z", 2, heads[1, 2]),
                            ("blocks.0.mlp.hook_post", 7, neurons[7])]:
        at = unit_index(name, unit)

        def patch(a, hook, name=name, at=at):
            a = a.clone()
            a[at] = cache[name][at]
            return a
        with torch.no_grad():
            want = base - metric(model.run_with_hooks(tokens, fwd_hooks=[(name, patch)]))
        torch.testing.assert_close(got, want)
    assert no_hooks(model)


def test_activation_readouts(model, tokens):
    _, cache = model.run_with_cache(tokens)
    z = torch.stack([cache["z", layer] for layer in range(2)])  # [layer batch pos head d_head]
    torch.testing.assert_close(B.activation_norm(model, tokens),
                               z.pow(2).sum((2, 4)).sqrt().mean(1))
    post = cache["post", 1]
    torch.testing.assert_close(B.activation_norm(model, tokens, Neurons(1)),
                               post.norm(dim=1).mean(0))
    torch.testing.assert_close(B.neuron_activation(model, tokens, 1), post[:, -1].mean(0))
    r = B.random_scores((2, 4), seed=3)
    assert r.shape == (2, 4) and torch.equal(r, B.random_scores((2, 4), seed=3))
    assert not torch.equal(r, B.random_scores((2, 4), seed=4))


def test_depass_scorers(model, tokens):
    """Wiring of DePass as a method: heads with the ratio rule equal the frozen-model zero
    ablation; token shares sum (with the bias) to the linearised log-prob."""
    metric = B.logit_diff_metric(ANSWERS, WRONG)
    torch.testing.assert_close(B.depass_heads(model, tokens, ANSWERS, WRONG, "ratio"),
                               compare.frozen_ablation(model, tokens, metric))
    scores = B.depass_tokens(model, tokens, ANSWERS, "ratio", bos=0)
    assert scores.shape == tokens.shape
    assert (scores[:, 1:] != 0).all()
    neurons = B.depass_neurons(model, tokens, ANSWERS, WRONG, 0, "ratio")
    assert neurons.shape == (24,) and not neurons.isnan().any()
    # zeroing a neuron in the frozen model moves the metric by exactly its ratio-rule share
    from tl_depass.engine.clean_run import record_clean_run
    from tl_depass.engine.replay import mlp_site

    clean = record_clean_run(model, tokens, None, lambda n: n.endswith(
        ("hook_scale", "hook_pattern", "mlp.hook_pre", "mlp.hook_post")))
    frozen = [(n, lambda x, hook, v=v: v) for n, v in clean.values.items()
              if n.endswith(("hook_scale", "hook_pattern"))]
    site = mlp_site(model, clean, "blocks.1.mlp")
    state = {}
    frozen += [("blocks.1.mlp.hook_pre", lambda x, hook: state.update(pre=x)),
               ("blocks.1.mlp.hook_post", lambda x, hook: state["pre"] * site.facts.ratio
                + site.facts.extra)]

    def zero(a, hook):
        a = a.clone()
        a[..., 4] = 0
        return a
    with torch.no_grad():
        drop = metric(clean.logits) - metric(model.run_with_hooks(
            tokens, fwd_hooks=[*frozen, ("blocks.0.mlp.hook_post", zero)]))
    # layer 0's neuron 4 flows through layer 1's frozen MLP ratio: exactly its DePass share
    torch.testing.assert_close(neurons[4], drop)


def test_baselines_run_on_a_transformer_bridge():
    """Everything goes through hook names, so a TransformerBridge (compatibility mode, same hook
    names) gives the same checks as a HookedTransformer."""
    from bridges import make_bridge

    bridge, _ = make_bridge("GPT2LMHeadModel", compat=True)
    tokens = torch.randint(0, 61, (2, 8), generator=torch.Generator().manual_seed(0))
    answers, wrong = torch.tensor([3, 4]), torch.tensor([5, 6])
    metric = B.logit_diff_metric(answers, wrong)
    rows = B.rollout_matrix(bridge, tokens).sum(-1)
    torch.testing.assert_close(rows, torch.ones(2, 8, dtype=torch.float64))
    scores, delta = B.integrated_gradients_with_delta(bridge, tokens, answers)
    assert delta.abs().max() < 1e-2 * scores.sum(1).abs().max()
    signed = B.attribution_patching(bridge, tokens, metric, absolute=False)
    fd = finite_difference_effect(bridge, tokens, metric, "blocks.1.attn.hook_z", 2, None)
    torch.testing.assert_close(signed[1, 2], fd, rtol=1e-6, atol=1e-9)

    def zero(z, hook):
        z = z.clone()
        z[:, :, 2] = 0
        return z
    with torch.no_grad():
        want = metric(bridge(tokens)) - metric(bridge.run_with_hooks(
            tokens, fwd_hooks=[("blocks.1.attn.hook_z", zero)]))
    torch.testing.assert_close(B.activation_patching(bridge, tokens, metric)[1, 2], want)
    assert B.attribution_patching(bridge, tokens, metric, Neurons(1)).shape == (bridge.cfg.d_mlp,)
    assert no_hooks(bridge)


def test_clear_errors_and_no_hooks_left(model, tokens):
    metric = B.logit_diff_metric(ANSWERS, WRONG)
    # jaxtyping's run-time check (on under the test suite) catches this before our message does
    from jaxtyping import TypeCheckError

    with pytest.raises((DepassError, TypeCheckError), match="answer|batch"):
        B.input_x_gradient(model, tokens, ANSWERS[:2])
    with pytest.raises(DepassError, match="same length"):
        B.attribution_patching(model, tokens, metric, corrupted=tokens[:, :5])
    with pytest.raises(DepassError, match="level must be"):
        B.activation_patching(model, tokens, metric, "neurons")  # no layer
    with pytest.raises(DepassError, match="Neurons: layer"):
        B.activation_patching(model, tokens, metric, Neurons(5))
    with pytest.raises(DepassError, match="the layer goes in the level"):
        B.activation_norm(model, tokens, Neurons(1), 1)

    def broken(z, hook):
        raise RuntimeError("a hook that fails mid-forward")
    with pytest.raises(RuntimeError), model.hooks(fwd_hooks=[("blocks.1.attn.hook_z", broken)]):
        B.occlusion(model, tokens, ANSWERS)
    assert no_hooks(model)


def test_hook_aliases_do_not_matter(model, tokens, monkeypatch):
    """A TransformerBridge may report another name (an alias) in `hook.name` than the one a hook
    was registered under; results must not depend on it."""
    metric = B.logit_diff_metric(ANSWERS, WRONG)
    want = B.attribution_patching(model, tokens, metric, absolute=False)
    monkeypatch.setattr(model.blocks[0].attn.hook_z, "name", "blocks.0.attn.alias_z")
    torch.testing.assert_close(B.attribution_patching(model, tokens, metric, absolute=False), want)


def test_old_forms_still_work_with_a_warning(model, tokens):
    """`(level: str, layer)` pairs and `integrated_gradients(return_delta=True)` are deprecated:
    the same numbers as the level objects and `integrated_gradients_with_delta`."""
    metric = B.logit_diff_metric(ANSWERS, WRONG)
    for old, new in [(("heads",), (Heads(),)), (("neurons", 1), (Neurons(1),))]:
        for fn in (B.attribution_patching, B.activation_patching, B.activation_norm):
            args = (model, tokens) if fn is B.activation_norm else (model, tokens, metric)
            with pytest.warns(DeprecationWarning, match="level object"):
                got = fn(*args, *old)
            torch.testing.assert_close(got, fn(*args, *new))
    with pytest.warns(DeprecationWarning, match="integrated_gradients_with_delta"):
        scores, delta = B.integrated_gradients(model, tokens, ANSWERS, steps=20, return_delta=True)
    want = B.integrated_gradients_with_delta(model, tokens, ANSWERS, steps=20)
    torch.testing.assert_close((scores, delta), want)
    torch.testing.assert_close(B.integrated_gradients(model, tokens, ANSWERS, steps=20), want[0])
    # a subset of layers: the rows of those layers
    torch.testing.assert_close(B.activation_patching(model, tokens, metric, Heads(layers=[1])),
                               B.activation_patching(model, tokens, metric)[1:])
    assert no_hooks(model)
