"""SPD on TransformerLens models: sites reproduce the hooks, all-ones masks give the target bit for
bit, subcomponent outputs sum to the hook value, training lowers the loss, save/load, errors."""

import dataclasses

import pytest
import torch
from torch.testing import assert_close

from tl_depass import completeness_rtol
from tl_depass.apd.configs import ConfigError, OptimConfig
from tl_depass.apd.lm.train import (
    TransformerSPDConfig,
    evaluate,
    masked_logits,
    site_inputs,
    train_spd,
)
from tl_depass.apd.lm.transformer import MATRICES, ParamDecomposition, find_sites, flatten_heads
from tl_depass.engine.backends import bridge_class, hooked_class
from tl_depass.errors import DepassError, UnsupportedModelError
from tl_depass.models.tasks import generate, vocab

needs_hooked = pytest.mark.skipif(hooked_class() is None, reason="needs HookedTransformer (TL 3.x)")
RECALL_VOCAB = len(vocab("recall"))


def tiny(**overrides):
    from tiny import GPT2_LIKE, LLAMA_LIKE, make_model  # skips the module on TL 4

    kinds = {"plain": {}, "gated": LLAMA_LIKE, "no_norm": dict(normalization_type=None),
             "ln_pre": dict(normalization_type="LNPre"), "gelu": GPT2_LIKE}
    kind = overrides.pop("kind", "plain")
    return make_model(**{**kinds[kind], **overrides})


def tokens_for(model, batch: int = 3, pos: int = 7):
    g = torch.Generator().manual_seed(5)
    return torch.randint(0, model.cfg.d_vocab, (batch, pos), generator=g)


def matrices_of(model) -> tuple[str, ...]:
    return MATRICES if model.cfg.gated_mlp else tuple(m for m in MATRICES if m != "W_gate")


def assert_hooks_reproduced(model, tokens, specs, dtype=torch.float64):
    _, cache = model.run_with_cache(tokens)
    for s in specs:
        x = flatten_heads(cache[s.input_hook], s.in_heads)
        y = flatten_heads(cache[s.output_hook], s.out_heads)
        scale = y.abs().max().item()
        assert_close(x @ s.weight + s.bias, y, rtol=0, atol=completeness_rtol(dtype) * scale,
                     msg=lambda m, s=s: f"{s.name} ({s.input_hook} -> {s.output_hook}): {m}")


@needs_hooked
@pytest.mark.parametrize("kind", ["plain", "gated", "no_norm", "ln_pre"])
def test_sites_reproduce_hook_values(kind):
    model = tiny(kind=kind)
    specs = find_sites(model, matrices_of(model))
    assert len(specs) == model.cfg.n_layers * len(matrices_of(model))
    assert_hooks_reproduced(model, tokens_for(model), specs)


@needs_hooked
def test_gated_sites_name_gate_and_linear_hooks():
    model = tiny(kind="gated")
    by_name = {s.name: s for s in find_sites(model, ("W_in", "W_gate", "W_V"), layers=(1,))}
    assert by_name["blocks.1.mlp.W_gate"].output_hook == "blocks.1.mlp.hook_pre"
    assert by_name["blocks.1.mlp.W_in"].output_hook == "blocks.1.mlp.hook_pre_linear"
    # grouped-query attention: hook_v holds the 2 key/value heads, not the 4 query heads
    assert by_name["blocks.1.attn.W_V"].out_heads == model.cfg.n_key_value_heads == 2


@needs_hooked
def test_site_weights_fold_the_norm_affine_map():
    model = tiny()
    spec = find_sites(model, ("W_in",), layers=(0,))[0]
    ln = model.blocks[0].ln2
    assert_close(spec.weight, ln.w[:, None] * model.W_in[0])
    assert_close(spec.bias, ln.b @ model.W_in[0] + model.b_in[0])


@pytest.fixture
def decomposed():
    model = tiny()
    dec = ParamDecomposition.from_model(model, matrices_of(model), C=10, seed=3)
    return model, dec, tokens_for(model)


@needs_hooked
def test_all_ones_masks_give_the_target_exactly(decomposed):
    model, dec, tokens = decomposed
    ones = {s.name: torch.ones(*tokens.shape, s.C) for s in dec}
    deltas = {s.name: torch.ones(tokens.shape) for s in dec}
    assert_close(masked_logits(model, dec, tokens, ones, deltas), model(tokens), rtol=0, atol=0)
    zeros = {name: torch.zeros_like(m) for name, m in ones.items()}
    off = masked_logits(model, dec, tokens, zeros, {k: torch.zeros_like(v) for k, v in deltas.items()})
    assert (off - model(tokens)).abs().max() > 1e-2  # masks do reach the model


@needs_hooked
def test_masked_site_is_the_masked_subcomponent_sum(decomposed):
    """In the masked forward the last site's output hook holds ((x V) ⊙ m) U + m_δ x Δ + b for its
    current input x, computed here independently from V, U and W."""
    model, dec, tokens = decomposed
    site = dec["blocks.1.mlp.W_out"]
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(*tokens.shape, site.C, generator=g)
    delta_mask = torch.rand(tokens.shape, generator=g)
    seen = {}  # the MLP output is read after the masking hook, from the residual stream
    hooks = [(name, lambda v, hook: seen.update({hook.name: v.clone()}))
             for name in (site.input_hook, "blocks.1.hook_resid_mid", "blocks.1.hook_resid_post")]
    with model.hooks(fwd_hooks=hooks):
        masked_logits(model, dec, tokens, {site.name: mask}, {site.name: delta_mask})
    x = seen[site.input_hook]
    seen["y"] = seen["blocks.1.hook_resid_post"] - seen["blocks.1.hook_resid_mid"]
    delta = site.weight - site.V @ site.U
    expected = ((x @ site.V) * mask) @ site.U + delta_mask[..., None] * (x @ delta) + site.bias
    assert_close(seen["y"], expected)


@needs_hooked
def test_outputs_sum_with_the_bias_to_the_hook_value(decomposed):
    model, dec, tokens = decomposed
    _, cache = model.run_with_cache(tokens)
    for site in dec:
        x = site.read(cache[site.input_hook])
        parts = site.outputs(x)
        assert parts.shape == (site.C + 1, *tokens.shape, site.weight.shape[1])
        hook = flatten_heads(cache[site.output_hook], site.out_heads)
        atol = completeness_rtol(torch.float64) * hook.abs().max().item()
        assert_close(parts.sum(0) + site.bias, hook, rtol=0, atol=atol,
                     msg=lambda m, s=site: f"{s.name}: {m}")
        c = 4  # one subcomponent by hand: U_c (V_c · x)
        assert_close(parts[c], (x @ site.V[:, c])[..., None] * site.U[c])
        assert_close(parts[-1], x @ (site.weight - site.V @ site.U))


@needs_hooked
def test_causal_importance_shape_and_range(decomposed):
    model, dec, tokens = decomposed
    _, inputs = site_inputs(model, dec, tokens)
    for site in dec:
        g = dec.causal_importance(site.name, inputs[site.name])
        assert g.shape == (*tokens.shape, site.C)
        assert g.max() <= 1 and g.min() >= -0.01 * site.ci_pre(inputs[site.name]).abs().max()


def short_config(**overrides) -> TransformerSPDConfig:
    optim = OptimConfig(lr=1e-2, steps=30, batch_size=8, schedule="constant")
    return TransformerSPDConfig(**{**dict(C=12, optim=optim, importance_coeff=1e-2,
                                          faithfulness_warmup_steps=20), **overrides})


@needs_hooked
def test_short_training_lowers_the_loss_and_is_deterministic():
    model = tiny(d_vocab=RECALL_VOCAB)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = short_config()
    dec = train_spd(model, cfg, progress="none", log_every=1)
    history = dec.meta["history"]
    assert len(history) == 1  # the last row only is kept in meta
    first = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, steps=1))
    start = train_spd(model, first, progress="none", log_every=1).meta["history"][0]["loss"]
    assert history[0]["loss"] < 0.7 * start, (start, history[0]["loss"])
    again = train_spd(model, cfg, progress="none")
    for (k, a), b in zip(dec.state_dict().items(), again.state_dict().values(), strict=True):
        assert_close(a, b, rtol=0, atol=0, msg=lambda m, k=k: f"{k}: {m}")
    for k, v in model.state_dict().items():  # the model is untouched, its flags restored
        assert_close(v, before[k], rtol=0, atol=0)
    assert all(p.requires_grad for p in model.parameters())
    batch = generate("recall", 16, seed=9)
    result = evaluate(model, dec, batch.tokens, batch.answers)
    assert result["all_ones"]["kl"] == 0.0
    assert set(result["sites"]) == set(dec.names)


@needs_hooked
def test_save_load_round_trip(tmp_path, decomposed):
    model, dec, tokens = decomposed
    dec.meta = {"note": "x", "numbers": [1, 2]}
    dec.save(tmp_path / "dec")
    back = ParamDecomposition.load(tmp_path / "dec.json")
    assert back.names == dec.names and back.meta == dec.meta
    for (k, a), (k2, b) in zip(dec.state_dict().items(), back.state_dict().items(), strict=True):
        assert k == k2
        assert_close(a, b, rtol=0, atol=0)
    _, inputs = site_inputs(model, dec, tokens)
    name = "blocks.0.attn.W_O"
    assert_close(back.causal_importance(name, inputs[name]), dec.causal_importance(name, inputs[name]))
    assert back[name].in_heads == model.cfg.n_heads
    assert max(back.weight_mismatch(model).values()) == 0.0


@needs_hooked
def test_clear_errors(tmp_path, decomposed):
    model, dec, _ = decomposed
    with pytest.raises(DepassError, match="no decomposed site 'blocks.5.mlp.W_in'.*blocks.0.mlp.W_in"):
        dec["blocks.5.mlp.W_in"]
    with pytest.raises(DepassError, match=r"layers \[2\] do not exist.*0\.\.1"):
        find_sites(model, ("W_in",), layers=(2,))
    with pytest.raises(DepassError, match="unknown matrices \\['W_Q'\\]"):
        find_sites(model, ("W_Q",))
    with pytest.raises(DepassError, match="not gated"):
        find_sites(model, ("W_gate",))
    with pytest.raises(DepassError, match="attention-only"):
        find_sites(tiny(attn_only=True), ("W_in",))
    with pytest.raises(UnsupportedModelError, match="use_split_qkv_input"):
        find_sites(tiny(use_split_qkv_input=True), ("W_V",))
    with pytest.raises(DepassError, match="missing"):
        ParamDecomposition.load(tmp_path / "nothing")
    with pytest.raises(ConfigError, match="matrices"):
        TransformerSPDConfig(matrices=("W_Q",))
    with pytest.raises(ConfigError, match="C and ci_hidden must be >= 1"):
        TransformerSPDConfig(C=0)


@pytest.mark.skipif(bridge_class() is None, reason="needs TransformerBridge")
def test_bundled_recall_sites_on_a_bridge():
    """The same sites, read through hook names and the Bridge's weights (TL-native Bridge, TL 4)."""
    from tl_depass import models

    try:
        bridge = models.load("recall", backend="bridge", dtype=torch.float64)
    except DepassError as e:
        pytest.skip(str(e))
    specs = find_sites(bridge, ("W_in", "W_out", "W_V", "W_O"))
    tokens = generate("recall", 4, seed=0).tokens
    assert_hooks_reproduced(bridge, tokens, specs)
    dec = ParamDecomposition(specs, C=6)
    ones = {s.name: torch.ones(*tokens.shape, s.C) for s in dec}
    deltas = {s.name: torch.ones(tokens.shape) for s in dec}
    assert_close(masked_logits(bridge, dec, tokens, ones, deltas), bridge(tokens), rtol=0, atol=0)


@pytest.mark.skipif(bridge_class() is None, reason="needs TransformerBridge")
@pytest.mark.parametrize("arch", ["GPT2LMHeadModel", "LlamaForCausalLM"])
def test_sites_on_hugging_face_bridges(arch):
    """Random HF models in a Bridge: plain GPT-2 and gated Llama with grouped-query attention.
    HF computes RMSNorm in float32 even in float64 models (tolerances.UPSTREAM_FLOAT32), so Llama
    agrees to float32 only."""
    from bridges import make_bridge

    from tl_depass.tolerances import UPSTREAM_FLOAT32

    bridge, _ = make_bridge(arch)
    matrices = MATRICES if bridge.cfg.gated_mlp else tuple(m for m in MATRICES if m != "W_gate")
    specs = find_sites(bridge, matrices)
    dtype = torch.float32 if arch in UPSTREAM_FLOAT32 else torch.float64
    assert_hooks_reproduced(bridge, torch.randint(0, 61, (2, 7), generator=torch.Generator().manual_seed(1)),
                            specs, dtype)


def test_shipped_recall_decomposition():
    """tl_depass/models/recall_spd: trained on the bundled recall model's weights, exact with all
    masks on, and the causal-importance-masked model (delta off) still answers."""
    from pathlib import Path

    from tl_depass import models

    path = Path(models.__file__).parent / "recall_spd.json"
    if not path.exists():
        pytest.skip("no shipped recall_spd decomposition")
    dec = ParamDecomposition.load(path)
    model = models.load("recall")
    assert max(dec.weight_mismatch(model).values()) == 0.0
    batch = generate("recall", 64, seed=4242)
    result = evaluate(model, dec, batch.tokens, batch.answers)
    assert result["all_ones"]["kl"] == 0.0
    assert result["ci_masked"]["accuracy"] >= 0.95 and result["ci_masked"]["kl_last"] < 0.1
    assert result["all_off"]["accuracy"] < 0.6  # the subcomponents carry the answer
    for name, site in result["sites"].items():
        assert site["ci_l0"] < site["C"] / 4, (name, site)  # sparse: few subcomponents per token
