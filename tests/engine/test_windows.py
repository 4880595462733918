"""Chunks of token components skip the positions before their first component (component p is
exactly zero before p in a causal model): each chunk's forward covers only its window, and the
results equal one forward holding every component, with padding, every rule, the position
embedding as a component, a later entry layer and logits at positions before a chunk's window."""

import pytest
import torch

import tl_depass

tiny = pytest.importorskip("tiny")


def same(part, whole, what):
    assert set(part.results) == set(whole.results)
    for name in whole.results:
        atol = tl_depass.completeness_rtol(torch.float64) * max(whole[name].abs().max().item(), 1.0)
        torch.testing.assert_close(part[name], whole[name], rtol=0, atol=atol,
                                   msg=lambda m, n=name: f"{what} {n}: {m}")


@pytest.mark.parametrize("rule", ["softmax", "max", "ratio"])
def test_each_chunk_runs_from_its_first_position(rule, windows):
    model = tiny.make_model()
    tokens = tiny.random_tokens(model, batch=2, pos=7)
    whole = tl_depass.decompose(model, tokens, mlp_rule=rule, logits="all")
    assert windows == [0]
    windows.clear()
    part = tl_depass.decompose(model, tokens, mlp_rule=rule, logits="all", chunk_size=2)
    assert windows == [0, 2, 4, 6]
    same(part, whole, f"{rule} chunk_size=2")
    for p in range(7):  # component p is exactly zero before p, as the windows assume
        assert not part["blocks.1.hook_resid_post"][p, :, :p].any()


@pytest.mark.parametrize("padding", ["left", "right"])
@pytest.mark.parametrize("logits", ["last", "all", "rows"])
def test_windows_with_padding_and_logit_positions(padding, logits, windows):
    """Right padding puts a row's last token before later chunks' first component: the window
    stops at the earliest logit position kept."""
    model = tiny.make_model()
    tokens = tiny.random_tokens(model, batch=2, pos=7)
    mask = torch.ones_like(tokens)
    if padding == "left":
        mask[0, :3] = 0
    else:
        mask[0, 3:] = 0
    if logits == "rows":  # one real position per row, 1 the earliest
        logits = torch.tensor([4, 1] if padding == "left" else [1, 4])
    for rule in ("softmax", "ratio"):
        opts = dict(mlp_rule=rule, attention_mask=mask, logits=logits)
        whole = tl_depass.decompose(model, tokens, **opts)
        windows.clear()
        part = tl_depass.decompose(model, tokens, chunk_size=3, **opts)
        if isinstance(logits, torch.Tensor):
            assert windows == [0, 1, 1]
        elif logits == "last" and padding == "right":
            assert windows == [0, 2, 2]  # row 0's last token is at position 2
        else:
            assert windows == [0, 3, 6]
        same(part, whole, f"{padding} padding, logits={logits!r}, {rule}")


def test_position_embedding_chunk_and_later_entry(windows):
    model = tiny.make_model(n_layers=3)
    tokens = tiny.random_tokens(model, batch=2, pos=6)
    whole = tl_depass.decompose(model, tokens, pos_embed="separate", logits="all")
    windows.clear()
    part = tl_depass.decompose(model, tokens, pos_embed="separate", logits="all", chunk_size=4)
    assert windows == [0, 0]  # the second chunk holds "pos", non-zero everywhere
    same(part, whole, "pos_embed='separate'")
    whole = tl_depass.decompose(model, tokens, tl_depass.TokensAt(1), mlp_rule="max")
    windows.clear()
    part = tl_depass.decompose(model, tokens, tl_depass.TokensAt(1), mlp_rule="max", chunk_size=2)
    assert windows == [0, 2, 4]
    same(part, whole, "TokensAt(1)")


def test_no_window_where_components_are_not_causal(windows):
    """Bidirectional attention carries a component backwards: every chunk covers every position."""
    model = tiny.make_model(attention_dir="bidirectional")
    tokens = tiny.random_tokens(model, batch=1, pos=5)
    whole = tl_depass.decompose(model, tokens, mlp_rule="ratio", logits="all")
    windows.clear()
    part = tl_depass.decompose(model, tokens, mlp_rule="ratio", logits="all", chunk_size=2)
    assert windows == [0, 0, 0]
    same(part, whole, "bidirectional")
    assert part["blocks.1.hook_resid_post"][4, 0, :4].abs().max() > 0  # it does reach back


@pytest.mark.parametrize("rule", ["ratio", "softmax", "max"])
def test_windows_by_default(rule, windows):
    """chunk_size=None: the token level runs in chunks of 16 positions or more, up to 8 (the
    linear rule one after another, the others in lockstep, engine/together.py); short prompts
    in one forward."""
    model = tiny.make_model(n_ctx=48)
    tokens = tiny.random_tokens(model, batch=1, pos=48)
    one = tl_depass.decompose(model, tokens, mlp_rule=rule, chunk_size=48)
    assert windows == [0]
    windows.clear()
    fast = tl_depass.decompose(model, tokens, mlp_rule=rule)
    assert windows == [0, 16, 32]
    same(fast, one, "default chunks")
    windows.clear()
    tl_depass.decompose(model, tokens[:, :31], mlp_rule=rule)
    assert windows == [0]
