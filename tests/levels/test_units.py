"""Heads, modules, neurons, subspaces and SAE features: completeness, known answers, and
agreement with the frozen model."""

import pytest
import torch
from matrix import MATRIX
from tiny import close, make_model, random_tokens

import tl_depass
from tl_depass import Heads, Modules, Neurons, SAEFeatures, Subspace, compare
from tl_depass.engine.rules import RULES

LEVELS = {
    "heads": lambda m: Heads(),
    "modules": lambda m: Modules(),
    "neurons": lambda m: Neurons(1, [0, 3, 5]),
    "subspace": lambda m: Subspace("blocks.1.hook_resid_pre", torch.randn(m.cfg.d_model, 3,
                                                                         dtype=torch.float64)),
    "sae": lambda m: SAEFeatures("blocks.1.hook_resid_pre", small_sae(m), features=[0, 2]),
}


def small_sae(model, d_sae: int = 12, seed: int = 5):
    g = torch.Generator().manual_seed(seed)
    d = model.cfg.d_model
    return (torch.randn(d, d_sae, generator=g, dtype=torch.float64),
            torch.randn(d_sae, generator=g, dtype=torch.float64),
            torch.randn(d_sae, d, generator=g, dtype=torch.float64) / d ** 0.5,
            torch.randn(d, generator=g, dtype=torch.float64))


def logit_diff(logits):
    return (logits[:, -1, 3] - logits[:, -1, 4]).mean()


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("arch", ["gpt2_ln", "llama_gqa", "parallel", "gemma2", "solu_ln"])
@pytest.mark.parametrize("level", LEVELS)
def test_completeness_every_level(level, arch, rule):
    model = make_model(**MATRIX[arch])
    torch.manual_seed(0)
    dec = tl_depass.decompose(model, random_tokens(model), LEVELS[level](model), mlp_rule=rule,
                              keep=lambda n: True)
    errors = dec.completeness_error()
    tol = tl_depass.completeness_rtol(torch.float64)
    bad = {k: v for k, v in errors.items() if not v <= tol}
    assert not bad, f"completeness broken at {bad}"


@pytest.mark.parametrize("arch", ["attn_only", "gpt2_ln"])
def test_heads_and_modules_of_attention_only_models(arch):
    model = make_model(**MATRIX[arch])
    dec = tl_depass.decompose(model, random_tokens(model), Modules())
    assert dec.labels[:2] == ["L0 rest", "L0 attn"]
    assert ("L0 mlp" in dec.labels) == (arch != "attn_only")


def test_one_layer_head_scores_are_direct_logit_attribution():
    """In a 1-layer attention-only model a head's total effect is its direct effect, which
    TransformerLens computes with the cached final-norm scale (apply_ln_to_stack); the b_O and
    norm-bias terms are the bias component's."""
    model = make_model(n_layers=1, attn_only=True)
    model.set_use_attn_result(True)
    tokens = random_tokens(model)
    dec = tl_depass.decompose(model, tokens, Heads())
    _, cache = model.run_with_cache(tokens)
    stack = cache.stack_head_results(layer=-1, pos_slice=-1)  # [head, batch, d_model]
    direction = model.W_U[:, 3] - model.W_U[:, 4]
    # apply_ln_to_stack centres and divides by the cached scale; the norm weight is ours to apply
    normed = cache.apply_ln_to_stack(stack, layer=-1, pos_slice=-1) * model.ln_final.w
    dla = normed @ direction  # [head, batch]
    scores = dec.head_scores(3, wrong=4)  # [batch, layer, head]
    close(scores[:, 0].T, dla, "head scores vs DLA")


@pytest.mark.parametrize("rule", RULES)
def test_all_layers_at_once_equal_one_layer_at_a_time(rule):
    model = make_model(n_layers=3, **MATRIX["llama_gqa"])
    tokens = random_tokens(model)
    together = tl_depass.decompose(model, tokens, Heads(), mlp_rule=rule, logits="all")
    for layer in range(3):
        alone = tl_depass.decompose(model, tokens, Heads([layer]), mlp_rule=rule, logits="all")
        group = together.groups[layer]
        assert together.labels[group] == alone.labels
        for name in alone.results:
            close(together[name][group], alone[name], f"{name}, layer {layer}")


@pytest.mark.parametrize("rule", RULES)
def test_head_chunking_is_exact(rule):
    model = make_model(**MATRIX["gpt2_ln"])
    tokens = random_tokens(model)
    whole = tl_depass.decompose(model, tokens, Heads(), mlp_rule=rule, logits="all")
    part = tl_depass.decompose(model, tokens, Heads(), mlp_rule=rule, chunk_size=3, logits="all")
    for name in whole.results:
        close(part[name], whole[name], name)


@pytest.mark.parametrize("arch", ["gpt2_ln", "llama_gqa"])
def test_neurons_post_mlp_residual(arch):
    """At the layer's resid_post, neuron i's share is exactly a_i W_out[i]; the rest and the bias
    together are the post-MLP residual minus the chosen neurons' outputs."""
    model = make_model(**MATRIX[arch])
    tokens = random_tokens(model)
    chosen = [1, 4, 9]
    dec = tl_depass.decompose(model, tokens, Neurons(1, chosen),
                              keep=["blocks.1.hook_resid_post"])
    _, cache = model.run_with_cache(tokens)
    mlp = model.blocks[1].mlp
    act = cache["blocks.1.mlp.hook_post"]
    if model.cfg.gated_mlp:  # TL's gated MLP adds b_in after the product: that part is bias
        act = mlp.act_fn(cache["blocks.1.mlp.hook_pre"]) * cache["blocks.1.mlp.hook_pre_linear"]
    resid = dec["blocks.1.hook_resid_post"]
    outs = [act[..., i, None] * mlp.W_out[i] for i in chosen]
    for j, i in enumerate(chosen):
        close(resid[1 + j], outs[j], f"neuron {i}")
    # rest + bias (b_out, and the layer's attention biases since the group enters at resid_pre)
    close(resid[0] + resid[-1], cache["blocks.1.hook_resid_post"] - sum(outs), "rest + bias")
    assert (resid[0] != 0).any() and (resid[-1] != 0).any()


@pytest.mark.parametrize("rule", RULES)
def test_neuron_chunks_equal_unchunked(rule):
    model = make_model()
    tokens = random_tokens(model)
    whole = tl_depass.decompose(model, tokens, Neurons(0), mlp_rule=rule, logits="all")
    part = tl_depass.decompose(model, tokens, Neurons(0), mlp_rule=rule, chunk_size=7, logits="all")
    for name in whole.results:
        close(part[name], whole[name], name)
    assert whole.neuron_scores(3).shape == (2, model.cfg.n_layers, model.cfg.d_mlp)


def test_subspace_projection():
    model = make_model()
    tokens = random_tokens(model)
    hook = "blocks.1.hook_resid_pre"
    g = torch.Generator().manual_seed(2)
    a, b = (torch.randn(16, k, generator=g, dtype=torch.float64) for k in (2, 1))
    dec = tl_depass.decompose(model, tokens, Subspace(hook, {"a": a, "b": b}), keep=[hook])
    assert dec.labels == ["a", "b", "rest", "bias"]
    _, cache = model.run_with_cache(tokens)
    x = cache[hook]
    q, _ = torch.linalg.qr(torch.cat([a, b], 1))
    close(dec[hook][0] + dec[hook][1], x @ q @ q.T, "projection onto the joint span")
    qa, _ = torch.linalg.qr(a)
    close(dec[hook][0] @ qa @ qa.T, dec[hook][0], "part a lies in span(a)")
    assert (dec[hook][2] @ q).abs().max() < 1e-12, "rest is not orthogonal to the subspaces"
    with pytest.raises(tl_depass.DepassError, match="not linearly independent"):
        tl_depass.decompose(model, tokens, Subspace(hook, {"a": a, "again": a[:, :1]}))


def test_probe_readout():
    model = make_model()
    tokens = random_tokens(model)
    hook = "blocks.1.hook_resid_post"
    w = torch.randn(16, dtype=torch.float64)
    dec = tl_depass.decompose(model, tokens, keep=[hook])
    _, cache = model.run_with_cache(tokens)
    close(dec.project(hook, w, bias=0.5).sum(0), cache[hook] @ w + 0.5, "probe logit")


def test_sae_features_sum_exactly():
    model = make_model()
    tokens = random_tokens(model)
    hook = "blocks.1.hook_resid_pre"
    sae = small_sae(model)
    dec = tl_depass.decompose(model, tokens, SAEFeatures(hook, sae, features=[0, 2]), keep=[hook])
    assert dec.labels == ["F0", "F2", "other features", "b_dec", "SAE error", "bias"]
    _, cache = model.run_with_cache(tokens)
    W_enc, b_enc, W_dec, b_dec = sae
    f = torch.relu((cache[hook] - b_dec) @ W_enc + b_enc)
    close(dec[hook][0], f[..., 0, None] * W_dec[0], "feature 0")
    close(dec[hook][3], b_dec.expand_as(cache[hook]), "b_dec")
    close(dec[hook][4], cache[hook] - f @ W_dec - b_dec, "SAE error")
    close(dec[hook][:-1].sum(0), cache[hook], "sum")

    class SaeLensLike(torch.nn.Module):  # the attributes and method sae_lens SAEs expose
        def __init__(self):
            super().__init__()
            self.W_enc, self.b_enc, self.W_dec, self.b_dec = map(torch.nn.Parameter, sae)

        def encode(self, x):
            return torch.relu((x - self.b_dec) @ self.W_enc + self.b_enc)

    other = tl_depass.decompose(model, tokens, SAEFeatures(hook, SaeLensLike(), features=[0, 2]),
                                keep=[hook])
    close(other[hook], dec[hook], "sae_lens-style object")


def test_zero_ablation_agrees_exactly_with_linear_rule():
    model = make_model(**MATRIX["llama_gqa"])
    tokens = random_tokens(model)
    dec = tl_depass.decompose(model, tokens, Heads(), mlp_rule="ratio", logits="all")
    shares = compare.metric_scores(model, dec, logit_diff).reshape(model.cfg.n_layers, -1)[:, 1:-1]
    close(shares, compare.frozen_ablation(model, tokens, logit_diff), "frozen zero ablation")
    close(dec.head_scores(3, wrong=4).mean(0), shares, "head_scores")


@pytest.mark.parametrize("level", ["heads", "positions", "mlp"])
def test_comparison_with_patching_runs(level):
    model = make_model()
    clean, corrupted = random_tokens(model), random_tokens(model, seed=9)
    result = compare.with_patching(model, clean, corrupted, logit_diff, level=level)
    width = model.cfg.n_heads if level == "heads" else clean.shape[1]
    assert result.depass.shape == result.patching.shape == (model.cfg.n_layers, width)
    assert -1 <= result.pearson <= 1 and -1 <= result.spearman <= 1
    assert len(result.frame) == model.cfg.n_layers * width
    assert torch.isfinite(result.depass).all()
