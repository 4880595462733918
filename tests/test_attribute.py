"""attribute(): the frozen-model backward path equals the folded forward (ratio rule); the
result is component first; bad shapes are refused by name."""

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
                                  "shortformer", "attn_result_split_qkv_mlp_in", "qwen3_qk_norm"])
def test_backward_equals_forward(arch, level):
    model = make_model(**MATRIX[arch])
    tokens = random_tokens(model, batch=3)
    fwd = tl_depass.attribute(model, tokens, LEVELS[level], answer=3, wrong=[4, 5, 6], pos=-2,
                              mlp_rule="ratio", method="forward")
    bwd = tl_depass.attribute(model, tokens, LEVELS[level], answer=3, wrong=[4, 5, 6], pos=-2,
                              mlp_rule="ratio")
    assert (fwd.method, bwd.method) == ("forward", "backward")
    assert fwd.labels == bwd.labels and not any(x.endswith(("rest", "bias")) for x in bwd.labels)
    assert fwd.component_labels == bwd.component_labels  # kind, layer, index, group: the same
    close(bwd.shares, fwd.shares, f"{arch} {level}")
    # the rest and bias: the same rows as decompose's on both paths, and the same clean readout
    assert fwd.remainder_labels == bwd.remainder_labels
    assert {x.kind for x in bwd.remainder_labels} == ({"bias"} if "tokens" in level else {"rest", "bias"})
    close(bwd.remainder_shares, fwd.remainder_shares, f"{arch} {level}: rest and bias")
    torch.testing.assert_close(bwd.metric, fwd.metric, rtol=0, atol=0)  # both read the clean run
    labels, shares = bwd.with_rest_and_bias()
    groups = torch.tensor([x.group for x in labels])
    for g in groups.unique():
        close(shares[groups == g].sum(0), bwd.metric, f"{arch} {level}: group {int(g)} sums to the metric")


def test_structured_labels_say_what_each_component_is(tmp_path):
    model = make_model(n_layers=2)
    tokens = random_tokens(model, batch=2)
    for method in ("forward", "backward"):
        heads = tl_depass.attribute(model, tokens, Heads(), answer=3, mlp_rule="ratio", method=method)
        assert [(x.kind, x.layer, x.index, x.group) for x in heads.component_labels] == [
            ("head", layer, h, layer) for layer in range(2) for h in range(model.cfg.n_heads)]
        neurons = tl_depass.attribute(model, tokens, Neurons(1, [5, 2]), answer=3, mlp_rule="ratio",
                                      method=method)
        assert [(x.kind, x.layer, x.index) for x in neurons.component_labels] == [
            ("neuron", 1, 5), ("neuron", 1, 2)]
        toks = tl_depass.attribute(model, tokens, "tokens", answer=3, mlp_rule="ratio", method=method)
        assert [(x.kind, x.index) for x in toks.component_labels] == [
            ("token", p) for p in range(tokens.shape[1])]
    heads.save(tmp_path / "att")
    loaded = tl_depass.Attribution.load(tmp_path / "att")
    assert loaded.component_labels == heads.component_labels
    assert loaded.remainder_labels == heads.remainder_labels  # the rest and bias travel too
    torch.testing.assert_close(loaded.remainder_shares, heads.remainder_shares, rtol=0, atol=0)
    torch.testing.assert_close(loaded.metric, heads.metric, rtol=0, atol=0)


def test_rest_and_bias_in_decomposes_order():
    """`with_rest_and_bias()` is decompose's logit attribution, rows and labels, on both paths."""
    model = make_model()
    tokens = random_tokens(model, batch=2)
    for spec in ("tokens", Heads(), Modules(), Neurons(0, [1, 4])):
        dec = tl_depass.decompose(model, tokens, spec, mlp_rule="ratio")
        for method in ("forward", "backward"):
            att = tl_depass.attribute(model, tokens, spec, answer=3, wrong=4, mlp_rule="ratio",
                                      method=method)
            labels, shares = att.with_rest_and_bias()
            assert labels == dec.component_labels, (spec, method)
            close(shares, dec.logit_attribution(3, 4), f"{spec} {method}")
    with pytest.raises(DepassError, match="no rest and bias"):
        tl_depass.Attribution(att.labels, shares=att.shares, method="backward").with_rest_and_bias()


def test_attention_only_modules():
    model = make_model(attn_only=True)
    tokens = random_tokens(model)
    fwd, bwd = (tl_depass.attribute(model, tokens, Modules(), answer=1, mlp_rule="ratio", method=m)
                for m in ("forward", "backward"))
    assert bwd.labels == ["L0 attn", "L1 attn"]
    close(bwd.shares, fwd.shares, "attn-only modules")


def test_the_shares_are_the_decompositions():
    """Forward mode is decompose's logit attribution, rest and bias left out."""
    model = make_model()
    tokens = random_tokens(model)
    att = tl_depass.attribute(model, tokens, Heads(), answer=2, mlp_rule="softmax")
    dec = tl_depass.decompose(model, tokens, Heads())
    assert att.method == "forward"
    close(att.shares, dec.head_scores(2).flatten(1).T, "softmax head shares")


def test_padding():
    model = make_model(**MATRIX["llama_gqa"])
    tokens = random_tokens(model)
    mask = torch.ones_like(tokens)
    mask[1, :3] = 0
    fwd, bwd = (tl_depass.attribute(model, tokens, "tokens", answer=1, mlp_rule="ratio",
                                    attention_mask=mask, method=m) for m in ("forward", "backward"))
    close(bwd.shares, fwd.shares, "left-padded tokens")
    assert (bwd.shares[:3, 1] == 0).all()


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


def test_component_first_like_logit_attribution():
    """`shares` is [component, batch], the rows of dec.logit_attribution; the old `scores`
    ([batch, component]) still works, with a DeprecationWarning."""
    model = make_model()
    tokens = random_tokens(model, batch=3)
    dec = tl_depass.decompose(model, tokens, Heads())
    named = [c for c, label in enumerate(dec.labels) if not label.endswith(("rest", "bias"))]
    for method in ("forward", "backward"):
        att = tl_depass.attribute(model, tokens, Heads(), answer=2, wrong=5, mlp_rule="ratio",
                                  method=method)
        assert att.shares.shape == (len(att.labels), 3)
        close(att.shares, tl_depass.decompose(model, tokens, Heads(), mlp_rule="ratio")
              .logit_attribution(2, 5)[named], f"{method}: shares")
        with pytest.warns(DeprecationWarning, match="shares"):
            old = att.scores
        torch.testing.assert_close(old, att.shares.T, rtol=0, atol=0)
    assert [dec.labels[c] for c in named] == att.labels
    with pytest.warns(DeprecationWarning, match="shares="):
        again = tl_depass.Attribution(att.labels, att.shares.T, "backward")  # the old positional form
    torch.testing.assert_close(again.shares, att.shares, rtol=0, atol=0)
    frame = att.to_frame()
    assert list(frame.columns) == ["batch", "component", "score"] and len(frame) == 3 * len(named)
    assert frame.score.iloc[1] == att.shares[1, 0].item()  # batch row 0, second component


def test_mean_readout():
    model = make_model()
    att = tl_depass.attribute(model, random_tokens(model, batch=3), Heads(), answer=2,
                              mlp_rule="ratio")
    close(att.mean(), att.shares.mean(1), "mean")
    weights = torch.tensor([1.0, 0.0, 1.0], dtype=att.shares.dtype)
    close(att.mean(weights), (att.shares[:, 0] + att.shares[:, 2]) / 2, "weighted mean")


def test_wrong_shapes_are_refused_by_name():
    model = make_model()
    tokens = random_tokens(model, batch=2)
    batch, pos = tokens.shape
    with pytest.raises(DepassError, match=r"attribute: attention_mask (?=.*\(3, 4\)).*batch pos"):
        tl_depass.attribute(model, tokens, answer=1, attention_mask=torch.ones(3, 4))
    with pytest.raises(DepassError, match=rf"attribute: attention_mask .*batch={batch}"):
        tl_depass.attribute(model, tokens, answer=1, mlp_rule="ratio",
                            attention_mask=torch.ones(batch + 1, pos, dtype=torch.long))
    with pytest.raises(DepassError, match=rf"attribute: pos .*#batch.*batch={batch}"):
        tl_depass.attribute(model, tokens, answer=1, pos=torch.tensor([1, 2, 3]))
    with pytest.raises(DepassError, match=r"attribute: tokens must be .*batch pos"):
        tl_depass.attribute(model, tokens[None], answer=1)
    with pytest.raises(DepassError, match=r"estimate_memory: tokens must be .*batch pos"):
        tl_depass.estimate_memory(model, tokens[None])
    att = tl_depass.attribute(model, tokens, Heads(), answer=1, mlp_rule="ratio")
    with pytest.raises(DepassError, match=rf"Attribution.mean: weights .*\[batch={batch}\]"):
        att.mean(torch.ones(batch + 1, dtype=att.shares.dtype))
    with pytest.raises(DepassError, match=r"Attribution.mean: weights must be .*batch"):
        att.mean(torch.ones(batch, 1, dtype=att.shares.dtype))
    with pytest.raises(DepassError, match=r"Attribution: shares must be .*component batch"):
        tl_depass.Attribution(att.labels, shares=att.shares[None], method="backward")
    with pytest.raises(DepassError, match=r"Attribution: shares has shape .*component="):
        tl_depass.Attribution(att.labels, shares=att.shares.T, method="backward")
    with pytest.raises(DepassError, match="model must be .*transformer_lens"):
        tl_depass.attribute(torch.nn.Linear(2, 2), tokens, answer=1)


@pytest.mark.parametrize("level", ["tokens", "heads", "neurons"])
def test_backward_unembeds_only_the_read_positions(level):
    """The backward path's frozen forward unembeds one position per batch row (the read one), not
    [batch, pos, d_vocab]; the shares stay those of the forward path, padding included."""
    model = make_model()
    tokens = random_tokens(model, batch=2)
    mask = torch.ones_like(tokens)
    mask[0, 5:] = 0  # right padding: row 0 is read at 4
    tokens = tokens.masked_fill(mask == 0, 0)
    pos = torch.tensor([4, 7])
    shapes = []
    model.add_hook("unembed.hook_out", lambda x, hook: shapes.append(tuple(x.shape)))
    try:
        bwd = tl_depass.attribute(model, tokens, LEVELS[level], answer=3, wrong=5, pos=pos,
                                  attention_mask=mask, mlp_rule="ratio", method="backward")
    finally:
        model.reset_hooks()
    batch, n = tokens.shape
    assert shapes == [(batch, n, model.cfg.d_vocab), (batch, 1, model.cfg.d_vocab)], shapes  # clean, frozen
    fwd = tl_depass.attribute(model, tokens, LEVELS[level], answer=3, wrong=5, pos=pos,
                              attention_mask=mask, mlp_rule="ratio", method="forward")
    close(bwd.shares, fwd.shares, f"{level} backward vs forward")
