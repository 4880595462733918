"""Chunked runs: the statistics sweep is a function (its statistics are its result, the same on
every call, equal to those of one forward holding every component), and chunked runs equal one
forward on every Bridge architecture (each sweep stops after its MLP's block)."""

import dataclasses

import pytest
import torch

import tl_depass
from tl_depass.engine.backends import bridge_class, hooked_class
from tl_depass.engine.clean_run import record_clean_run
from tl_depass.engine.plan import make_plan
from tl_depass.engine.replay import FoldedForward, RuleSetup
from tl_depass.engine.sweep import chunks_of, statistics


def model_and_tokens(backend: str):
    if backend == "hooked":
        if hooked_class() is None:
            pytest.skip("this transformer_lens has no HookedTransformer")
        from tiny import make_model, random_tokens

        model = make_model()
        return model, random_tokens(model, batch=2, pos=6)
    if bridge_class() is None:
        pytest.skip("this transformer_lens has no TransformerBridge")
    from bridges import make_bridge

    return make_bridge(backend)[0], torch.randint(0, 61, (2, 6), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("rule", ["softmax", "max"])
@pytest.mark.parametrize("backend", ["hooked", "GPT2LMHeadModel"])
def test_the_sweep_returns_the_statistics_of_every_component(backend, rule):
    model, tokens = model_and_tokens(backend)
    clean = record_clean_run(model, tokens, None, lambda name: True)
    plan = make_plan(model, clean, tl_depass.TokensAt(0).groups(model, clean, tokens), [])
    setup = RuleSetup(rule, 0.1, torch.zeros(plan.total, *tokens.shape, dtype=torch.bool))
    chunks = chunks_of(plan, 2)
    assert len(chunks) == 3
    first = statistics(model, tokens, None, clean, plan, setup, chunks)
    again = statistics(model, tokens, None, clean, plan, setup, chunks)
    assert list(first) == [site.prefix for site in plan.mlps] == list(again)
    assert statistics(model, tokens, None, clean, plan, RuleSetup("ratio", 0.1, setup.excluded), chunks) == {}
    assert statistics(model, tokens, None, clean, plan, setup, chunks_of(plan, None)) == {}
    for site in plan.mlps:  # one forward with every component, the earlier MLPs' statistics given
        whole = FoldedForward(model, clean, plan, setup, 0, plan.total, first).statistics(site, tokens, None)
        for field in ("top", "rest"):
            torch.testing.assert_close(getattr(first[site.prefix], field), getattr(whole, field),
                                       msg=lambda m, s=site, f=field: f"{s.prefix} {f}: {m}")
            torch.testing.assert_close(getattr(again[site.prefix], field),
                                       getattr(first[site.prefix], field), rtol=0, atol=0)


@pytest.mark.parametrize("arch", ["GPT2LMHeadModel", "OPTForCausalLM", "GPTJForCausalLM",
                                  "Gemma2ForCausalLM"])
def test_chunked_runs_equal_one_forward_on_bridges(arch):
    model, tokens = model_and_tokens(arch)
    for spec in ("tokens", tl_depass.Heads()):
        what = f"{arch} {spec}"
        whole = tl_depass.decompose(model, tokens, spec, logits="all")
        last = tl_depass.decompose(model, tokens, spec)  # the default: each row's last token
        for logits in ("all", "last", None):
            part = tl_depass.decompose(model, tokens, spec, chunk_size=2, logits=logits)
            for name in part.results:
                ref = (last if logits == "last" else whole)[name]
                atol = tl_depass.completeness_rtol(torch.float64) * ref.abs().max().item()
                torch.testing.assert_close(part[name], ref, rtol=0, atol=atol,
                                           msg=lambda m, n=name, w=what: f"{w} {n}: {m}")


@pytest.mark.parametrize("rule", ["ratio", "softmax"])
@pytest.mark.parametrize("pos_embed", ["with_token", "separate"])
def test_token_level_chunked_equals_whole_entry(rule, pos_embed, monkeypatch):
    """The token level builds its entry states per chunk: every chunked run is bit-identical (in
    float64) to the same run with the [pos, batch, pos, d_model] entry stack built whole, and
    equals one forward (to the completeness tolerance: BLAS sums a chunk of rows in another
    order than a whole batch, about 1e-16 apart, as it did before; and a chunk's forward skips
    the positions before its first component)."""
    from tl_depass.levels import tokens as token_level
    from tl_depass.levels.base import stored

    model, tokens = model_and_tokens("hooked")
    opts = dict(mlp_rule=rule, pos_embed=pos_embed, keep=None, logits="all")
    whole = tl_depass.decompose(model, tokens, **opts)
    lazy = {c: tl_depass.decompose(model, tokens, chunk_size=c, **opts) for c in (1, 2, 5)}

    lazy_entry = token_level.position_entry

    def whole_stack(hook, resid, extra=None):
        states = token_level.by_position(resid)
        entry = stored(hook, states if extra is None else torch.cat([states, extra[None]]))
        # the same windows as the lazy entry (chunks skip the positions before their first)
        return dataclasses.replace(entry, first=lazy_entry(hook, resid, extra).first)

    monkeypatch.setattr(token_level, "position_entry", whole_stack)
    for chunk, part in lazy.items():
        eager = tl_depass.decompose(model, tokens, chunk_size=chunk, **opts)
        assert set(part.results) == set(whole.results) == set(eager.results)
        for name in whole.results:
            torch.testing.assert_close(part[name], eager[name], rtol=0, atol=0,
                                       msg=lambda m, n=name, c=chunk: f"chunk_size={c} {n}: {m}")
            atol = tl_depass.completeness_rtol(torch.float64) * whole[name].abs().max().item()
            torch.testing.assert_close(part[name], whole[name], rtol=0, atol=atol,
                                       msg=lambda m, n=name, c=chunk: f"chunk_size={c} {n}: {m}")


def test_token_level_entry_is_built_per_chunk(monkeypatch):
    """With a small chunk_size the token level never builds its [pos, batch, pos, d_model] entry
    stack whole: the largest entry block has chunk_size components (counted in this test only)."""
    from tl_depass.levels import tokens as token_level

    model, tokens = model_and_tokens("hooked")
    built: list[tuple[int, ...]] = []
    original = token_level.by_position

    def counting(resid, offset=0, k=None):
        out = original(resid, offset, k)
        built.append(tuple(out.shape))
        return out

    monkeypatch.setattr(token_level, "by_position", counting)
    n = tokens.shape[1]
    tl_depass.decompose(model, tokens, mlp_rule="ratio", keep=[], chunk_size=2)
    assert built and max(s[0] for s in built) == 2, built
    assert sum(s[0] for s in built) == n, built  # each position's state built once
    built.clear()
    tl_depass.decompose(model, tokens, mlp_rule="ratio", keep=[])
    assert [s[0] for s in built] == [n], built  # one chunk: the whole stack, once
