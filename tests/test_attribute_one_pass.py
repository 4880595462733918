"""attribute()'s backward path runs the model once: the frozen forward freezes each norm scale,
attention pattern and MLP ratio at the values it computes itself (no separate clean run), its
values are the clean run's exactly, and its shares are the forward path's."""

import pytest
import torch
from counting import forwards
from matrix import MATRIX
from tiny import close, make_model, random_tokens

import tl_depass
from tl_depass import Heads, Modules, Neurons, TokensAt
from tl_depass.errors import DepassError

LEVELS = {"tokens": "tokens", "tokens_at_1": TokensAt(1), "heads": Heads(), "modules": Modules(),
          "neurons": Neurons(1, [0, 3, 5])}


@pytest.mark.parametrize("level", list(LEVELS))
@pytest.mark.parametrize("arch", ["gpt2_ln", "llama_gqa", "solu_ln"])
def test_one_forward_same_shares(arch, level):
    model = make_model(**MATRIX[arch])
    tokens = random_tokens(model, batch=3)
    mask = torch.ones_like(tokens)
    mask[1, :2] = 0  # left padding in one row

    def attribute(method):
        return tl_depass.attribute(model, tokens, LEVELS[level], answer=3, wrong=[4, 5, 6], pos=-1,
                                   attention_mask=mask, mlp_rule="ratio", method=method)
    n, bwd = forwards(model, lambda: attribute("backward"))
    assert n == 1, f"the backward path ran {n} forwards of the model"
    fwd = attribute("forward")
    close(bwd.shares, fwd.shares, f"{arch} {level}")
    close(bwd.remainder_shares, fwd.remainder_shares, f"{arch} {level}: rest and bias")
    torch.testing.assert_close(bwd.metric, fwd.metric, rtol=0, atol=0)  # the clean logits, exactly


def test_the_frozen_forward_computes_the_clean_values_exactly():
    """Every residual stream value and the logits of the one frozen forward are bit for bit
    those of a plain forward (the freezing hooks return the model's own values)."""
    model = make_model(**MATRIX["gpt2_ln"])
    tokens = random_tokens(model, batch=2)
    names = [f"blocks.{layer}.hook_{x}" for layer in range(model.cfg.n_layers)
             for x in ("resid_pre", "resid_mid", "resid_post")] + ["ln_final.hook_normalized"]
    seen: dict[str, torch.Tensor] = {}

    def record(x, hook):  # the first value at each hook (the unembedding runs twice)
        seen.setdefault(hook.name, x.detach().clone())
    for name in [*names, "unembed.hook_out"]:
        model.add_hook(name, record)
    try:
        tl_depass.attribute(model, tokens, Heads(), answer=3, mlp_rule="ratio", method="backward")
    finally:
        model.reset_hooks()
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens, return_type="logits")
    for name in names:
        assert torch.equal(seen[name], cache[name]), f"{name} differs from the clean run"
    assert torch.equal(seen["unembed.hook_out"], logits), "the logits differ from the clean run"


def test_a_non_finite_model_names_the_first_non_finite_hook():
    model = make_model()
    tokens = random_tokens(model)
    with torch.no_grad():
        model.blocks[1].attn.W_V.fill_(torch.nan)
    with pytest.raises(DepassError, match=r"not finite: NaN or inf first appear at blocks\.1\.attn\.hook_v"):
        tl_depass.attribute(model, tokens, Heads(), answer=1, mlp_rule="ratio", method="backward")
    assert sum(len(m._forward_hooks) for m in model.modules()) == 0
