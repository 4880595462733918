"""Bad input gets a clear error that names the problem and the fix."""

import pytest
import torch
from tiny import make_model, random_tokens

import tl_depass
from tl_depass import DepassError, UnsupportedModelError


@pytest.mark.parametrize("bad, match", [
    (lambda m, t: dict(tokens=t.float()), "integer tensor"),
    (lambda m, t: dict(tokens=t[None]), r"shape \[batch, pos\]"),
    (lambda m, t: dict(tokens=t + m.cfg.d_vocab), "outside the vocabulary"),
    (lambda m, t: dict(tokens=torch.zeros(1, m.cfg.n_ctx + 1, dtype=torch.long)), "n_ctx"),
    (lambda m, t: dict(tokens=t, attention_mask=torch.ones(1, 3)), "attention_mask has shape"),
    (lambda m, t: dict(tokens=t, attention_mask=2 * torch.ones_like(t)), "only 0"),
    (lambda m, t: dict(tokens=t, mlp_rule="taylor"), "mlp_rule"),
    (lambda m, t: dict(tokens=t, temperature=0.0), "temperature"),
    (lambda m, t: dict(tokens=t, chunk_size=0), "chunk_size"),
    (lambda m, t: dict(tokens=t, keep=["blocks.0.hook_resid_prex"]), "did you mean"),
    (lambda m, t: dict(tokens=t, keep=["blocks.0.attn.hook_pattern"]), "freezes it"),
    (lambda m, t: dict(tokens=t, components=tl_depass.TokensAt(1), keep=["blocks.0.hook_resid_post"]),
     "before the components enter"),
    (lambda m, t: dict(tokens=t, components="heads"), "unknown components"),
    (lambda m, t: dict(tokens=t, components=tl_depass.TokensAt(9)), "no hook"),
    (lambda m, t: dict(tokens=t, components=tl_depass.Split(
        "blocks.1.hook_resid_pre", torch.randn(2, *t.shape, m.cfg.d_model, dtype=torch.float64))),
     "do not sum"),
    (lambda m, t: dict(tokens=t, components=tl_depass.Split(
        "blocks.1.hook_resid_pre", torch.randn(2, 5, dtype=torch.float64))), "Split tensor has shape"),
])
def test_bad_input(model, bad, match):
    tokens = random_tokens(model)
    with pytest.raises(DepassError, match=match):
        tl_depass.decompose(model, **bad(model, tokens))


def test_string_input_without_tokenizer(model):
    with pytest.raises(DepassError, match="tokenizer"):
        tl_depass.decompose(model, "hello")


def test_separate_positions_need_learned_positions():
    model = make_model(positional_embedding_type="rotary", rotary_dim=4)
    with pytest.raises(DepassError, match="with_token"):
        tl_depass.decompose(model, random_tokens(model), pos_embed="separate")


def test_unsupported_model_lists_every_problem():
    model = make_model(clip_qkv=1.0)
    model.cfg.num_experts = 4  # MoE flag, set after construction to avoid building experts
    with pytest.raises(UnsupportedModelError, match="num_experts.*clip_qkv.*Supported"):
        tl_depass.decompose(model, random_tokens(model))


def test_not_a_model():
    with pytest.raises(DepassError, match="HookedTransformer"):
        tl_depass.decompose(torch.nn.Linear(2, 2), torch.zeros(1, 2, dtype=torch.long))


def test_readout_errors(model):
    tokens = random_tokens(model)
    mask = torch.ones_like(tokens)
    mask[1, -2:] = 0
    dec = tl_depass.decompose(model, tokens, attention_mask=mask, logits="all")
    with pytest.raises(DepassError, match="padding in batch rows"):
        dec.logit_attribution(3)
    with pytest.raises(DepassError, match="outside the vocabulary"):
        dec.logit_attribution(model.cfg.d_vocab, pos=0)
    with pytest.raises(KeyError, match="keep="):
        dec["blocks.0.hook_mlp_out"]
