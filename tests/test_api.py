"""The public surface: labels, readouts, entry points, options."""

import pandas as pd
import pytest
import torch
from tiny import close, random_tokens

import tl_depass


def test_labels_and_shapes(model):
    tokens = random_tokens(model, batch=1)
    dec = tl_depass.decompose(model, tokens)
    assert dec.labels[-1] == "bias" and len(dec.labels) == tokens.shape[1] + 1
    assert dec.labels[1] == f"tok 1 [{int(tokens[0, 1])}]"
    # logits="last" (the default since 0.2.0): [component, batch, d_vocab] at each row's last token
    assert dec.logits.shape == (len(dec.labels), 1, model.cfg.d_vocab)
    assert dec.logit_positions.tolist() == [tokens.shape[1] - 1]
    every = tl_depass.decompose(model, tokens, logits="all")
    assert every.logits.shape == (len(dec.labels), 1, tokens.shape[1], model.cfg.d_vocab)
    assert dec["blocks.1.hook_resid_post"].shape == (len(dec.labels), 1, tokens.shape[1], 16)


def test_logit_attribution_and_frame(model):
    tokens = random_tokens(model)
    dec = tl_depass.decompose(model, tokens)
    clean = model(tokens)
    score = dec.logit_attribution(3, wrong=torch.tensor([4, 5]), pos=-1)
    assert score.shape == (len(dec.labels), 2)
    torch.testing.assert_close(score.sum(0), clean[:, -1, 3] - clean[[0, 1], -1, [4, 5]])
    frame = dec.to_frame()
    assert isinstance(frame, pd.DataFrame) and list(frame.columns) == [
        "component", "kind", "layer", "index", "batch", "score"]
    top = clean[:, -1].argmax(-1)
    for b in range(2):
        total = frame[frame.batch == b].score.sum()
        assert total == pytest.approx(clean[b, -1, top[b]].item(), abs=1e-9)


def test_tokens_at_layer(model):
    """TokensAt(l): each position's residual at layer l is a component; downstream of l it
    agrees with a Split built from the same residual."""
    tokens = random_tokens(model)
    dec = tl_depass.decompose(model, tokens, tl_depass.TokensAt(1))
    assert dec.labels[0].startswith("L1 tok 0")
    assert "blocks.0.hook_resid_post" not in dec
    _, cache = model.run_with_cache(tokens)
    resid = cache["blocks.1.hook_resid_pre"]
    parts = torch.stack([torch.where(torch.arange(8)[None, :, None] == p, resid, 0) for p in range(8)])
    split = tl_depass.decompose(model, tokens, tl_depass.Split("blocks.1.hook_resid_pre", parts))
    for name in dec.results:
        close(dec[name], split[name], name)


def test_split_mid_block_and_labels(model):
    tokens = random_tokens(model)
    hook = "blocks.0.hook_resid_mid"
    _, cache = model.run_with_cache(tokens)
    half = cache[hook] / 2
    dec = tl_depass.decompose(model, tokens, tl_depass.Split(hook, torch.stack([half, half]),
                                                              labels=("a", "b")))
    assert dec.labels == ["a", "b", "bias"]
    close(dec.logits[0], dec.logits[1], "logits")


def test_separate_position_component(model):
    tokens = random_tokens(model)
    dec = tl_depass.decompose(model, tokens, pos_embed="separate", keep=["blocks.0.hook_resid_pre"])
    assert dec.labels[-2:] == ["pos", "bias"]
    _, cache = model.run_with_cache(tokens)
    torch.testing.assert_close(dec["blocks.0.hook_resid_pre"][-2], cache["hook_pos_embed"])
    torch.testing.assert_close(dec["blocks.0.hook_resid_pre"][3, :, 3], cache["hook_embed"][:, 3])


@pytest.mark.parametrize("rule", ["softmax", "max"])
def test_ignore_bos(model, rule):
    """With BOS first, its component gets no MLP share except at its own position."""
    tokens = random_tokens(model, bos=0)
    keep = ["blocks.0.mlp.hook_post", "blocks.1.mlp.hook_post"]
    on = tl_depass.decompose(model, tokens, mlp_rule=rule, ignore_bos=0, keep=keep)
    off = tl_depass.decompose(model, tokens, mlp_rule=rule, ignore_bos=False, keep=keep)
    for hook in keep:
        assert (on[hook][0, :, 1:] == 0).all()
        assert (off[hook][0, :, 1:] != 0).any()
        torch.testing.assert_close(on[hook][0, :, 0], off[hook][0, :, 0])
    no_bos = tl_depass.decompose(model, random_tokens(model), mlp_rule=rule, ignore_bos=0, keep=keep)
    plain = tl_depass.decompose(model, random_tokens(model), mlp_rule=rule, ignore_bos=False, keep=keep)
    torch.testing.assert_close(no_bos.logits, plain.logits, rtol=0, atol=0)


def test_softmax_tends_to_max(model):
    tokens = random_tokens(model)
    cold = tl_depass.decompose(model, tokens, mlp_rule="softmax", temperature=1e-6)
    hard = tl_depass.decompose(model, tokens, mlp_rule="max")
    torch.testing.assert_close(cold.logits, hard.logits, rtol=0, atol=1e-8)
