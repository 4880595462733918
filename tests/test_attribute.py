"""attribute(): the frozen-model backward path equals the folded forward (ratio rule)."""

import pytest
import torch
from matrix import MATRIX
from tiny import close, make_model, random_tokens

import tl_depass
from tl_depass import Heads, Modules, Neurons, TokensAt
from tl_depass.errors import DepassError

LEVELS = {"tokens": "tokens", "tokens_at_1": TokensAt(1), "heads": Heads(), "modules": Modules(),
          "neurons": Neurons(1, [0, 3, 5, 17]), "heads_layer_1": Heads([1])}


@pytest.mark.parametrize("level", list(LEVELS))
@pytest.mark.parametrize("arch", ["gpt2_ln", "llama_gqa", "parallel", "gemma2", "solu_ln",
                                  "shortformer", "attn_result_split_qkv_mlp_in"])
def test_backward_equals_forward(arch, level):
    model = make_model(**MATRIX[arch])
    tokens = random_tokens(model, batch=3)
    fwd = tl_depass.attribute(model, tokens, LEVELS[level], answer=3, wrong=[4, 5, 6], pos=-2,
                              mlp_rule="ratio", method="forward")
    bwd = tl_depass.attribute(model, tokens, LEVELS[level], answer=3, wrong=[4, 5, 6], pos=-2,
                              mlp_rule="ratio")
    assert (fwd.method, bwd.method) == ("forward", "backward")
    assert fwd.labels == bwd.labels and not any(x.endswith(("rest", "bias")) for x in bwd.labels)
    close(bwd.scores, fwd.scores, f"{arch} {level}")


def test_attention_only_modules():
    model = make_model(attn_only=True)
    tokens = random_tokens(model)
    fwd, bwd = (tl_depass.attribute(model, tokens, Modules(), answer=1, mlp_rule="ratio", method=m)
                for m in ("forward", "backward"))
    assert bwd.labels == ["L0 attn", "L1 attn"]
    close(bwd.scores, fwd.scores, "attn-only modules")


def test_the_shares_are_the_decompositions():
    """Forward mode is decompose's logit attribution, rest and bias left out."""
    model = make_model()
    tokens = random_tokens(model)
    att = tl_depass.attribute(model, tokens, Heads(), answer=2, mlp_rule="softmax")
    dec = tl_depass.decompose(model, tokens, Heads())
    assert att.method == "forward"
    close(att.scores, dec.head_scores(2).flatten(1), "softmax head shares")


def test_padding():
    model = make_model(**MATRIX["llama_gqa"])
    tokens = random_tokens(model)
    mask = torch.ones_like(tokens)
    mask[1, :3] = 0
    fwd, bwd = (tl_depass.attribute(model, tokens, "tokens", answer=1, mlp_rule="ratio",
                                    attention_mask=mask, method=m) for m in ("forward", "backward"))
    close(bwd.scores, fwd.scores, "left-padded tokens")
    assert (bwd.scores[1, :3] == 0).all()


def test_model_untouched_and_no_gradients_left():
    model = make_model()
    tokens = random_tokens(model)
    before = model(tokens)
    tl_depass.attribute(model, tokens, Heads(), answer=1, mlp_rule="ratio")
    assert all(p.grad is None for p in model.parameters()), "gradients accumulated on the weights"
    assert sum(len(m._forward_hooks) for m in model.modules()) == 0
    torch.testing.assert_close(model(tokens), before, rtol=0, atol=0)


def test_errors():
    model = make_model()
    tokens = random_tokens(model)
    with pytest.raises(DepassError, match="only for the linear rule"):
        tl_depass.attribute(model, tokens, answer=1, mlp_rule="softmax", method="backward")
    with pytest.raises(DepassError, match="method='forward'"):
        tl_depass.attribute(model, tokens, answer=1, mlp_rule="ratio", method="backward",
                            pos_embed="separate")
    with pytest.raises(DepassError, match="unknown method"):
        tl_depass.attribute(model, tokens, answer=1, method="sideways")
    with pytest.raises(DepassError, match="outside the vocabulary"):
        tl_depass.attribute(model, tokens, answer=10_000, mlp_rule="ratio")
