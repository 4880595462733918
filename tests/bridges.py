"""Tiny TransformerBridge models built offline from randomly initialised Hugging Face models,
every parameter randomised (HF, like TL, starts biases at 0 and norm weights at 1)."""

import types
import warnings
from contextlib import contextmanager

import pytest
import torch

from tl_depass.tolerances import UPSTREAM_FLOAT32

transformers = pytest.importorskip("transformers")

COMMON = dict(vocab_size=61, tie_word_embeddings=False)
LLAMA = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=32, rms_norm_eps=1e-6)

# architecture -> HF config class name and its fields (2 layers, d_model 32, 4 heads)
CONFIGS = {
    "GPT2LMHeadModel": ("GPT2Config", dict(n_layer=2, n_embd=32, n_head=4, n_positions=32)),
    "GPTNeoXForCausalLM": ("GPTNeoXConfig", dict(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=32, rotary_pct=0.5, use_parallel_residual=True)),
    "GPTJForCausalLM": ("GPTJConfig", dict(n_layer=2, n_embd=32, n_head=4, n_positions=32,
                                           rotary_dim=4)),
    "OPTForCausalLM": ("OPTConfig", dict(hidden_size=32, ffn_dim=48, num_hidden_layers=2,
                                         num_attention_heads=4, max_position_embeddings=32,
                                         word_embed_proj_dim=32)),
    "LlamaForCausalLM": ("LlamaConfig", dict(LLAMA, num_key_value_heads=2)),
    "Qwen2ForCausalLM": ("Qwen2Config", dict(LLAMA, num_key_value_heads=2)),
    "Qwen3ForCausalLM": ("Qwen3Config", dict(LLAMA, num_key_value_heads=2, head_dim=8)),
    "Gemma2ForCausalLM": ("Gemma2Config", dict(
        LLAMA, num_key_value_heads=2, head_dim=8, attn_logit_softcapping=5.0,
        final_logit_softcapping=3.0, query_pre_attn_scalar=8, sliding_window=4)),
    "PhiForCausalLM": ("PhiConfig", dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                         num_attention_heads=4, max_position_embeddings=32,
                                         partial_rotary_factor=0.5)),
    "BloomForCausalLM": ("BloomConfig", dict(hidden_size=32, n_layer=2, n_head=4)),
    "OlmoForCausalLM": ("OlmoConfig", dict(  # LayerNorm without weights (eps fixed at 1e-5)
        {k: v for k, v in LLAMA.items() if k != "rms_norm_eps"}, num_key_value_heads=2)),
}
ARCHITECTURES = list(CONFIGS)


def hf_model(arch: str, seed: int = 0, dtype=torch.float64):
    name, fields = CONFIGS[arch]
    cfg = getattr(transformers, name)(**COMMON, **fields, architectures=[arch])
    torch.manual_seed(seed)
    model = getattr(transformers, arch)(cfg).eval().to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return model


def make_bridge(arch: str, seed: int = 0, dtype=torch.float64, compat: bool = False):
    from transformer_lens.model_bridge.sources import build_bridge_from_module

    hf = hf_model(arch, seed, dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bridge = build_bridge_from_module(hf, arch, hf_config=hf.config)
        if compat:
            bridge.enable_compatibility_mode()
    return bridge, hf


def rms_norm_float64(self, x):
    """An HF RMSNorm (Llama, Qwen, Gemma's `1 + weight`) computed in the input's dtype."""
    eps = getattr(self, "variance_epsilon", getattr(self, "eps", 0))
    scale = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    weight = 1 + self.weight if "Gemma" in type(self).__name__ else self.weight
    return weight * (x * scale)


def layer_norm_float64(self, x):
    """OLMo's weightless LayerNorm (eps 1e-5) in the input's dtype."""
    return torch.nn.functional.layer_norm(x, self.normalized_shape, eps=1e-5)


@contextmanager
def float64_reference(hf):
    """Inside: `hf` recomputes in its own dtype what HF computes in float32 (see
    tolerances.UPSTREAM_FLOAT32): RMSNorm in the model's dtype, and the eager attention path
    DePass's clean run takes. Restored afterwards."""
    arch = hf.config.architectures[0]
    norms = [m for m in hf.modules() if type(m).__name__.endswith("RMSNorm")]
    olmo = [m for m in hf.modules() if type(m).__name__ == "OlmoLayerNorm"]
    impl = hf.config._attn_implementation
    assert not norms + olmo or arch in UPSTREAM_FLOAT32, f"{arch}: float32 norms, no UPSTREAM_FLOAT32 entry"
    for m in norms:
        m.forward = types.MethodType(rms_norm_float64, m)
    for m in olmo:
        m.forward = types.MethodType(layer_norm_float64, m)
    norms += olmo
    hf.set_attn_implementation("eager")
    try:
        yield hf
    finally:
        hf.set_attn_implementation(impl)
        for m in norms:
            del m.forward
