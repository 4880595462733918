"""DePass on TransformerBridge (TL 3.9 and 4.x): ten Hugging Face families, raw and compatibility
mode, built offline from random HF models with every parameter randomised."""

import pytest
import torch
from bridges import ARCHITECTURES, float64_reference, make_bridge

import tl_depass
from tl_depass import compare, completeness_rtol
from tl_depass.engine.backends import bridge_class, hooked_class
from tl_depass.tolerances import upstream_rtol

if bridge_class() is None:
    pytest.skip("this transformer_lens has no TransformerBridge", allow_module_level=True)

F64 = completeness_rtol(torch.float64)


def bridge_or_skip(arch: str, compat: bool):
    bridge, hf = make_bridge(arch, compat=compat)
    tokens = torch.randint(0, 61, (2, 7), generator=torch.Generator().manual_seed(1))
    try:
        bridge(tokens)
    except RuntimeError as e:  # a TransformerLens bug, not ours: the plain forward fails too
        pytest.skip(f"{arch} compat={compat}: the Bridge's own forward fails here ({e})")
    return bridge, hf, tokens


def hook_count(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("compat", [False, True], ids=["raw", "compat"])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_completeness_every_level(arch, compat):
    bridge, hf, tokens = bridge_or_skip(arch, compat)
    with torch.no_grad():
        before = bridge(tokens)
        with float64_reference(hf):
            reference = hf(tokens).logits
    attn = hf.config._attn_implementation
    hooks = hook_count(bridge)
    cases = [("tokens", "softmax"), ("tokens", "max"), ("tokens", "ratio"),
             (tl_depass.Heads(), "softmax"), (tl_depass.Modules(), "ratio"),
             (tl_depass.Neurons(1), "softmax")]
    for components, rule in cases:
        dec = tl_depass.decompose(bridge, tokens, components, mlp_rule=rule, logits="all")
        for hook, err in dec.completeness_error().items():
            assert err <= F64, f"{arch} {components} {rule}: {hook} off by {err:.1e}"
        # The clean run is the model computed in float64 throughout (HF's float32 ops redone in
        # float64), and agrees with the model's own forward as far as HF's float32 ops allow.
        scale = reference.abs().max().item()
        torch.testing.assert_close(dec.clean_logits, reference, rtol=0, atol=F64 * scale,
                                   msg=lambda m: f"{arch}: clean logits are not the float64 model's: {m}")
        rtol = upstream_rtol(arch, torch.float64)
        torch.testing.assert_close(dec.clean_logits, before, rtol=0, atol=rtol * before.abs().max().item(),
                                   msg=lambda m: f"{arch}: clean logits are not the model's: {m}")
    assert hook_count(bridge) == hooks, "DePass left hooks on the Bridge"
    assert hf.config._attn_implementation == attn, "the attention implementation was not restored"
    with torch.no_grad():
        torch.testing.assert_close(bridge(tokens), before, rtol=0, atol=0)


def logit_diff(logits):
    return (logits[:, -1, 3] - logits[:, -1, 4]).sum()


@pytest.mark.parametrize("arch", ["GPT2LMHeadModel", "GPTJForCausalLM", "OPTForCausalLM",
                                  "LlamaForCausalLM", "BloomForCausalLM", "OlmoForCausalLM"])
def test_linear_rule_equals_frozen_zero_ablation(arch):
    """The intervention oracle on a Bridge: removing a head in the frozen model moves the metric
    by exactly its ratio-rule share (also for adapters that delegate attention to HF)."""
    bridge, _, tokens = bridge_or_skip(arch, False)
    dec = tl_depass.decompose(bridge, tokens, tl_depass.Heads(), mlp_rule="ratio", logits="all")
    shares = compare.metric_scores(bridge, dec, logit_diff).reshape(2, -1)[:, 1:-1]
    oracle = compare.frozen_ablation(bridge, tokens, logit_diff)
    torch.testing.assert_close(shares, oracle, rtol=0, atol=F64 * oracle.abs().max().item(),
                               msg=lambda m: f"{arch}: {m}")


def test_aliases_and_raw_names_resolve():
    bridge, _, tokens = bridge_or_skip("GPT2LMHeadModel", False)
    dec = tl_depass.decompose(bridge, tokens, keep=["blocks.1.hook_in", "blocks.0.mlp.out.hook_in"])
    assert set(dec.results) == {"blocks.1.hook_resid_pre", "blocks.0.mlp.hook_post", "logits"}
    torch.testing.assert_close(dec["blocks.1.hook_in"], dec["blocks.1.hook_resid_pre"])


HT_CONFIGS = {  # the HookedTransformerConfig of the same tiny models as tests/bridges.py
    "GPT2LMHeadModel": ("convert_gpt2_weights", dict(act_fn="gelu_new", d_mlp=128, normalization_type="LN",
                                                     eps=1e-5)),
    "LlamaForCausalLM": ("convert_llama_weights", dict(
        act_fn="silu", d_mlp=48, normalization_type="RMS", positional_embedding_type="rotary",
        rotary_dim=8, rotary_base=10000.0, gated_mlp=True, final_rms=True, eps=1e-6,
        n_key_value_heads=2, rotary_adjacent_pairs=False)),
}


@pytest.mark.skipif(hooked_class() is None, reason="needs HookedTransformer (transformer_lens < 4)")
@pytest.mark.parametrize("arch", list(HT_CONFIGS))
def test_bridge_equals_hooked_transformer(arch):
    """The same weights as a HookedTransformer and as a Bridge give the same decomposition."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.pretrained import weight_conversions

    bridge, hf, tokens = bridge_or_skip(arch, False)
    convert, fields = HT_CONFIGS[arch]
    cfg = HookedTransformerConfig(n_layers=2, d_model=32, n_heads=4, d_head=8, d_vocab=61, n_ctx=32,
                                  dtype=torch.float64, **fields)
    ht = HookedTransformer(cfg).eval()
    ht.load_state_dict(getattr(weight_conversions, convert)(hf, cfg), strict=False)
    # HF's float32 RMSNorm makes the two models themselves differ by ~1e-7 (Llama)
    rtol = upstream_rtol(arch, torch.float64)
    for components in ["tokens", tl_depass.Heads(), tl_depass.Neurons(1)]:
        ours, theirs = (tl_depass.decompose(m, tokens, components, logits="all") for m in (ht, bridge))
        assert ours.labels == theirs.labels and set(ours.results) == set(theirs.results)
        for name, value in ours.results.items():
            torch.testing.assert_close(theirs[name], value, rtol=0, atol=rtol * value.abs().max().item(),
                                       msg=lambda m, what=f"{arch} {components} {name}": f"{what}: {m}")


@pytest.mark.parametrize("arch", ["GPT2LMHeadModel", "LlamaForCausalLM"])
def test_right_padding(arch):
    """A right-padded row gives the unpadded row's result; padded positions get zero shares."""
    bridge, _, tokens = bridge_or_skip(arch, False)
    short = tokens[1:, :4]
    padded = torch.cat([tokens[:1], torch.cat([short, torch.zeros(1, 3, dtype=torch.long)], 1)])
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 4:] = 0
    dec = tl_depass.decompose(bridge, padded, attention_mask=mask, logits="all")
    alone = tl_depass.decompose(bridge, short, logits="all")
    for name, value in alone.results.items():
        torch.testing.assert_close(dec[name][:4, 1, :4], value[:-1, 0], msg=lambda m, n=name: f"{n}: {m}")
        torch.testing.assert_close(dec[name][-1, 1, :4], value[-1, 0], msg=lambda m, n=name: f"{n}: {m}")
        assert (dec[name][:, 1, 4:] == 0).all(), f"padded positions have shares at {name}"


@pytest.mark.parametrize("arch", ["GPTJForCausalLM", "OPTForCausalLM", "Gemma2ForCausalLM"])
def test_backward_path(arch):
    """attribute()'s frozen-model backward path equals the folded forward on a Bridge."""
    bridge, _, tokens = bridge_or_skip(arch, False)
    for components in ["tokens", tl_depass.Heads(), tl_depass.Modules(), tl_depass.Neurons(0)]:
        fwd, bwd = (tl_depass.attribute(bridge, tokens, components, answer=3, wrong=4, mlp_rule="ratio",
                                        method=m) for m in ("forward", "backward"))
        assert fwd.labels == bwd.labels
        torch.testing.assert_close(bwd.scores, fwd.scores, rtol=0, atol=F64 * fwd.scores.abs().max().item(),
                                   msg=lambda m, c=components: f"{arch} {c}: {m}")
        assert fwd.remainder_labels == bwd.remainder_labels  # each group's rest and bias
        torch.testing.assert_close(bwd.remainder_shares, fwd.remainder_shares, rtol=0,
                                   atol=F64 * fwd.scores.abs().max().item(),  # the bias: 0 here
                                   msg=lambda m, c=components: f"{arch} {c} rest and bias: {m}")


@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "GPTNeoXForCausalLM"])
def test_keep_every_hook(arch):
    """`keep=lambda name: True` keeps every hook that is a sum of shares; the rotary tables
    (`hook_cos`, `hook_sin`: functions of the position only) are left out, as the frozen
    patterns and scales are, and naming one is refused."""
    bridge, _, tokens = bridge_or_skip(arch, False)
    dec = tl_depass.decompose(bridge, tokens, keep=lambda name: True)
    assert not [n for n in dec.results if n.endswith(("hook_cos", "hook_sin", "hook_pattern"))]
    assert "blocks.1.attn.hook_rot_q" in dec.results or arch != "LlamaForCausalLM"
    for hook, err in dec.completeness_error().items():
        assert err <= F64, f"{arch}: {hook} off by {err:.1e}"
    with pytest.raises(tl_depass.DepassError, match="hook_cos is not a sum of component shares"):
        tl_depass.decompose(bridge, tokens, keep=["blocks.0.attn.hook_cos"])
