"""Chunks in lockstep (engine/together.py): the softmax/max rules' token level runs in windowed
chunks that meet at every MLP. The results equal one forward's (every rule with statistics, a
GPT-2-like and a Llama-like model, padding, logits at every position), the chunks take turns (one
thread each, one running at a time), and an error in one chunk stops them all and leaves the model
as it was."""

import threading

import pytest
import torch

import tl_depass
from tl_depass.engine import rules, sweep

tiny = pytest.importorskip("tiny")  # HookedTransformer only (TransformerLens 3.x)

F64 = tl_depass.completeness_rtol(torch.float64)


@pytest.fixture
def chunks(monkeypatch):
    """How many chunks each lockstep run of a call had."""
    seen, run = [], sweep.run_together
    monkeypatch.setattr(sweep, "run_together", lambda m, t, k, forwards, s: seen.append(len(forwards))
                        or run(m, t, k, forwards, s))
    return seen


def hook_count(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("rule", ["softmax", "max"])
@pytest.mark.parametrize("padding", [None, "left", "right"])
def test_lockstep_equals_one_forward(arch, rule, padding, chunks):
    model = tiny.make_model(**dict(tiny.GPT2_LIKE if arch == "gpt2" else tiny.LLAMA_LIKE, n_ctx=70))
    tokens = tiny.random_tokens(model, batch=2, pos=70)
    mask = None
    if padding:
        mask = torch.ones_like(tokens)
        mask[1, :7] = 0 if padding == "left" else 1
        mask[1, -7:] = 0 if padding == "right" else 1
    options = dict(mlp_rule=rule, attention_mask=mask, logits="all", ignore_bos=False)
    lockstep = tl_depass.decompose(model, tokens, **options)
    assert chunks == [4]
    one = tl_depass.decompose(model, tokens, chunk_size=70, **options)
    assert chunks == [4]  # one forward: no lockstep
    assert set(lockstep.results) == set(one.results)
    for name, value in one.results.items():
        torch.testing.assert_close(lockstep.results[name], value, rtol=F64,
                                   atol=F64 * value.abs().max().item(), msg=name)


def test_chunks_take_turns():
    """Each round, every chunk runs to its next MLP in chunk order, one thread each, one at a time."""
    model = tiny.make_model(n_ctx=48)
    tokens = tiny.random_tokens(model, batch=1, pos=48)
    seen, running, most, lock = [], set(), [0], threading.Lock()

    def record(x, hook):
        with lock:
            seen.append((hook.name, x.shape[1], threading.get_ident()))
            running.add(threading.get_ident())
            most[0] = max(most[0], len(running))

    def leave(x, hook):  # the chunk waits at the MLP after this hook (or ends)
        with lock:
            running.discard(threading.get_ident())
    names = ["blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre", "ln_final.hook_normalized"]
    waits = ["blocks.0.mlp.hook_pre", "blocks.1.mlp.hook_pre", "unembed.hook_out"]
    with model.hooks(fwd_hooks=[(n, record) for n in names] + [(n, leave) for n in waits]):
        tl_depass.decompose(model, tokens, keep=[])
    folded = seen[-9:]
    windows = [48, 32, 16]  # three chunks of 16 positions
    assert [(n, pos) for n, pos, _ in folded] == [(n, pos) for n in names for pos in windows]
    assert len({t for _, _, t in folded}) == 3 and most[0] == 1


def test_an_error_in_one_chunk_stops_all_and_leaves_the_model(monkeypatch):
    model = tiny.make_model(n_ctx=48)
    tokens = tiny.random_tokens(model, batch=1, pos=48)
    before = hook_count(model)
    calls, shares = [], rules.shares

    def failing(*args):  # chunks 0, 1, 2 at the first MLP, then chunk 1 fails at the second
        calls.append(args)
        if len(calls) == 5:
            raise RuntimeError("boom in chunk 1")
        return shares(*args)
    monkeypatch.setattr(rules, "shares", failing)
    with pytest.raises(RuntimeError, match="boom in chunk 1"):
        tl_depass.decompose(model, tokens)
    assert len(calls) == 5
    assert hook_count(model) == before
    assert not any("forward" in m.__dict__ for m in model.modules())
    monkeypatch.undo()
    torch.testing.assert_close(tl_depass.decompose(model, tokens).clean_logits, model(tokens))
