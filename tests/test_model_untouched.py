"""The user's model is left exactly as it was."""

import pytest
import torch
from tiny import make_model, random_tokens

import tl_depass


def hook_count(model) -> int:
    return sum(len(hp._forward_hooks) + len(hp._backward_hooks) for hp in model.modules())


def test_no_hooks_weights_or_outputs_changed():
    model = make_model()
    tokens = random_tokens(model)
    weights = {n: p.detach().clone() for n, p in model.state_dict().items()}
    before = model(tokens)
    dec = tl_depass.decompose(model, tokens, chunk_size=3)
    assert hook_count(model) == 0
    for n, p in model.state_dict().items():
        assert torch.equal(p, weights[n]), f"parameter {n} changed"
    torch.testing.assert_close(model(tokens), before, rtol=0, atol=0)
    torch.testing.assert_close(dec.clean_logits, before, rtol=0, atol=0)


def test_softcapped_clean_logits_are_the_models():
    model = make_model(output_logits_soft_cap=3.0)
    tokens = random_tokens(model)
    dec = tl_depass.decompose(model, tokens)
    torch.testing.assert_close(dec.clean_logits, model(tokens), rtol=0, atol=0)
    assert (dec.logits.sum(0).abs() > 3.0).any(), "decomposed logits must be pre-softcap"


def test_hooks_removed_after_an_exception_mid_pass():
    model = make_model()
    tokens = random_tokens(model)

    class Boom(Exception):
        pass

    def boom(x, hook):
        if x.shape[0] > tokens.shape[0]:  # only in the folded pass
            raise Boom

    model.blocks[1].hook_attn_out.add_hook(boom)  # a user's permanent-style hook, level 0
    with pytest.raises(Boom):
        tl_depass.decompose(model, tokens)
    assert hook_count(model) == 1, "DePass hooks were left behind after the exception"
    model.reset_hooks()


def test_users_own_hooks_survive():
    model = make_model()
    tokens = random_tokens(model)
    seen = []
    model.blocks[0].hook_resid_post.add_hook(lambda x, hook: seen.append(x.shape[0]))
    tl_depass.decompose(model, tokens)
    assert hook_count(model) == 1, "the user's hook was removed or ours was left behind"
    model.reset_hooks()
