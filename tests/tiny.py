"""Tiny TransformerLens models with EVERY parameter randomised (biases and norm weights included).

TransformerLens initialises biases to 0 and norm weights to 1, which hides bias and scale bugs, so
every test model goes through `randomise`.
"""

import pytest
import torch

from tl_depass import completeness_rtol
from tl_depass.engine.backends import hooked_class

if hooked_class() is None:
    pytest.skip("this transformer_lens has no HookedTransformer (4.x removed it); the Bridge tests "
                "(tests/engine/test_backends_bridge.py) cover this version", allow_module_level=True)
from transformer_lens import HookedTransformer, HookedTransformerConfig  # noqa: E402

BASE = dict(n_layers=2, d_model=16, n_ctx=12, d_head=4, n_heads=4, d_mlp=24, d_vocab=20,
            act_fn="gelu", normalization_type="LN", seed=0)

GPT2_LIKE = dict(BASE, positional_embedding_type="standard", act_fn="gelu_new")
LLAMA_LIKE = dict(BASE, normalization_type="RMS", positional_embedding_type="rotary",
                  rotary_dim=4, gated_mlp=True, act_fn="silu", n_key_value_heads=2,
                  final_rms=True)


def randomise(model: HookedTransformer, seed: int = 0) -> HookedTransformer:
    """Fill every parameter with random values: weights ~ N(0, 0.3), biases ~ N(0, 0.2),
    norm weights ~ 1 + N(0, 0.2)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype)
            leaf = name.rsplit(".", 1)[-1].lstrip("_")
            if leaf == "w":  # norm weights
                p.copy_(1 + 0.2 * noise)
            elif leaf.startswith("b"):
                p.copy_(0.2 * noise)
            else:
                p.copy_(0.3 * noise)
    return model


def make_model(dtype=torch.float64, seed: int = 0, **overrides) -> HookedTransformer:
    cfg = HookedTransformerConfig(**dict(GPT2_LIKE, dtype=dtype, **overrides))
    return randomise(HookedTransformer(cfg), seed).eval()


def random_tokens(model: HookedTransformer, batch: int = 2, pos: int = 8, seed: int = 1,
                  bos: int | None = None) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, model.cfg.d_vocab, (batch, pos), generator=g)
    if bos is not None:
        tokens[:, 0] = bos
    return tokens


def close(actual: torch.Tensor, expected: torch.Tensor, what: str = "") -> None:
    """Equal up to the float64 completeness tolerance, relative to max|expected|; the failure
    message names `what` (the hook)."""
    atol = completeness_rtol(torch.float64) * expected.abs().max().clamp_min(1e-30).item()
    torch.testing.assert_close(actual, expected, rtol=0, atol=atol, msg=lambda m: f"{what}: {m}")
