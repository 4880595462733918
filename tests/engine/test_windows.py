"""Chunks of token components skip the positions before their first component (component p is
exactly zero before p in a causal model): each chunk's forward covers only its window, and the
results equal one forward holding every component, with padding, every rule, the position
embedding as a component, a later entry layer and logits at positions before a chunk's window."""

import pytest
import torch

import tl_depass
from tl_depass.engine import sweep

tiny = pytest.importorskip("tiny")


@pytest.fixture
def windows(monkeypatch):
    """The windows of the forwards that keep values (not the statistics sweep's), in chunk order."""
    seen: list[int] = []

    class Recording(sweep.FoldedForward):
        def inputs(self, tokens, attention_mask, collect=None):
            if collect is None:
                seen.append(self.window)
            return super().inputs(tokens, attention_mask, collect)

    monkeypatch.setattr(sweep, "FoldedForward", Recording)
    return seen


@pytest.fixture
def together(monkeypatch):
    """How many chunks each run of chunks together had."""
    runs: list[int] = []
    original = sweep.run_together

    def recording(model, tokens, mask, forwards):
        runs.append(len(forwards))
        return original(model, tokens, mask, forwards)

    monkeypatch.setattr(sweep, "run_together", recording)
    return runs


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


def test_default_chunks_are_windows(windows, together):
    """chunk_size=None: the token level runs in chunks of 16 positions or more, up to 8; the
    linear rule one after another, the softmax/max rules together from 4 chunks (meeting at each
    MLP: the same as the sweep, bit for bit); short prompts in one forward."""
    model = tiny.make_model(n_ctx=64)
    tokens = tiny.random_tokens(model, batch=2, pos=64)
    for rule in ("ratio", "softmax", "max"):
        one = tl_depass.decompose(model, tokens, mlp_rule=rule, chunk_size=64)
        swept = tl_depass.decompose(model, tokens, mlp_rule=rule, chunk_size=16)
        windows.clear()
        together.clear()
        fast = tl_depass.decompose(model, tokens, mlp_rule=rule)
        assert sorted(windows) == [0, 16, 32, 48], rule
        assert together == ([] if rule == "ratio" else [4]), rule
        same(fast, one, f"{rule} default chunks")
        for name in fast.results:
            torch.testing.assert_close(fast[name], swept[name], rtol=0, atol=0,
                                       msg=lambda m, n=name, r=rule: f"{r} {n}: {m}")
    for rule, n, expected in (("ratio", 31, [0]), ("ratio", 32, [0, 16]), ("softmax", 63, [0])):
        windows.clear()
        tl_depass.decompose(model, tokens[:, :n], mlp_rule=rule)
        assert windows == expected, (rule, n)


def test_chunks_together_fail_cleanly(monkeypatch):
    """An error in one chunk's thread stops the others (none waits forever at the meeting), is
    raised to the caller, and leaves no hook behind."""
    from tl_depass.engine import rules

    model = tiny.make_model(n_ctx=64)
    tokens = tiny.random_tokens(model, batch=1, pos=64)
    original = rules.shares

    def failing(rule, g, *args):
        if g.shape[2] < 64:  # a windowed chunk
            raise RuntimeError("boom in a chunk")
        return original(rule, g, *args)

    monkeypatch.setattr(rules, "shares", failing)
    with pytest.raises(RuntimeError, match="boom in a chunk"):
        tl_depass.decompose(model, tokens)
    assert not any(h._forward_hooks for h in model.hook_dict.values())
    assert all(not m._forward_hooks and "forward" not in m.__dict__ for m in model.modules())
    monkeypatch.setattr(rules, "shares", original)
    tl_depass.decompose(model, tokens)  # and the model still works


def test_chunks_chosen_for_memory_run_one_after_another(together):
    model = tiny.make_model(n_ctx=64)
    tokens = tiny.random_tokens(model, batch=1, pos=64)
    need = tl_depass.estimate_memory(model, tokens, max_memory=2**62).total
    tl_depass.decompose(model, tokens, max_memory=int(need * 0.7))
    assert together == []
