"""More Hugging Face families on the TransformerBridge, beyond the full matrix of tests/bridges.py:
each decomposes completely at the token, head and neuron levels with right padding, chunked
runs equal whole ones, and the model is left as it was; mixture-of-experts models get the
unsupported-model error (their routing is not frozen)."""

import pytest
import torch
from bridges import CONFIGS, LLAMA, make_bridge

import tl_depass
from tl_depass import compare
from tl_depass.engine.backends import bridge_class
from tl_depass.errors import UnsupportedModelError

if bridge_class() is None:
    pytest.skip("this transformer_lens has no TransformerBridge", allow_module_level=True)

F64 = tl_depass.completeness_rtol(torch.float64)
GQA = dict(LLAMA, num_key_value_heads=2)
MORE = {
    "MistralForCausalLM": ("MistralConfig", dict(GQA, sliding_window=4)),
    "GemmaForCausalLM": ("GemmaConfig", dict(GQA, head_dim=8)),
    "Gemma3ForCausalLM": ("Gemma3TextConfig", dict(GQA, head_dim=8, query_pre_attn_scalar=8,
                                                   sliding_window=4)),
    "Olmo2ForCausalLM": ("Olmo2Config", GQA),
    "StableLmForCausalLM": ("StableLmConfig", GQA),
    "Phi3ForCausalLM": ("Phi3Config", dict(GQA, pad_token_id=0)),
    "GPTNeoForCausalLM": ("GPTNeoConfig", dict(num_layers=2, hidden_size=32, num_heads=4,
                                               max_position_embeddings=32, window_size=4,
                                               attention_types=[[["global", "local"], 1]])),
    "FalconForCausalLM": ("FalconConfig", dict(hidden_size=32, num_hidden_layers=2,
                                               num_attention_heads=4, new_decoder_architecture=False)),
}
MOE = {
    "MixtralForCausalLM": ("MixtralConfig", dict(GQA, num_local_experts=4, num_experts_per_tok=2)),
    "Qwen3MoeForCausalLM": ("Qwen3MoeConfig", dict(GQA, head_dim=8, num_experts=4, num_experts_per_tok=2,
                                                   moe_intermediate_size=16, decoder_sparse_step=1)),
}
TOKENS = torch.randint(0, 61, (2, 9), generator=torch.Generator().manual_seed(1))


def bridge(arch, monkeypatch):
    import transformers

    name = {**MORE, **MOE}[arch][0]
    if not hasattr(transformers, name) or not hasattr(transformers, arch):
        pytest.skip(f"this transformers has no {arch}")
    monkeypatch.setitem(CONFIGS, arch, {**MORE, **MOE}[arch])
    try:
        return make_bridge(arch)[0]
    except Exception as e:  # an adapter this TransformerLens lacks
        pytest.skip(f"no TransformerBridge for {arch} here ({type(e).__name__}: {e})")


@pytest.mark.parametrize("arch", list(MORE))
def test_complete_chunked_and_untouched(arch, monkeypatch):
    model = bridge(arch, monkeypatch)
    mask = torch.ones_like(TOKENS)
    mask[1, 6:] = 0
    with torch.no_grad():
        before = model(TOKENS, attention_mask=mask)
    for components in ("tokens", tl_depass.Heads(), tl_depass.Neurons(1)):
        whole = tl_depass.decompose(model, TOKENS, components, attention_mask=mask, logits="all")
        for hook, err in whole.completeness_error().items():
            assert err <= F64, f"{arch} {components}: {hook} off by {err:.1e}"
        part = tl_depass.decompose(model, TOKENS, components, attention_mask=mask, logits="all", chunk_size=3)
        for name, value in whole.results.items():
            torch.testing.assert_close(part[name], value, rtol=0, atol=F64 * value.abs().max().item(),
                                       msg=lambda m, n=name, c=components: f"{arch} {c} {n}: {m}")
            assert not value[:, 1, 6:].any(), f"{arch} {components} {name}: padding has shares"
    with torch.no_grad():
        torch.testing.assert_close(model(TOKENS, attention_mask=mask), before, rtol=0, atol=0)


def logit_diff(logits):
    return (logits[:, -1, 3] - logits[:, -1, 4]).sum()


@pytest.mark.parametrize("arch", list(MORE))
def test_linear_rule_equals_frozen_zero_ablation(arch, monkeypatch):
    """The intervention oracle: removing a head from the frozen model moves the metric by exactly
    its ratio-rule share (as tests/engine/test_backends_bridge.py checks for the main matrix)."""
    model = bridge(arch, monkeypatch)
    dec = tl_depass.decompose(model, TOKENS, tl_depass.Heads(), mlp_rule="ratio", logits="all")
    shares = compare.metric_scores(model, dec, logit_diff).reshape(2, -1)[:, 1:-1]
    oracle = compare.frozen_ablation(model, TOKENS, logit_diff)
    torch.testing.assert_close(shares, oracle, rtol=0, atol=F64 * oracle.abs().max().item(),
                               msg=lambda m: f"{arch}: {m}")


@pytest.mark.parametrize("arch", list(MOE))
def test_mixture_of_experts_is_refused(arch, monkeypatch):
    model = bridge(arch, monkeypatch)
    with pytest.raises(UnsupportedModelError, match="num_experts"):
        tl_depass.decompose(model, TOKENS)
