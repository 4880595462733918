"""Chunked runs: the statistics sweep is a function (its statistics are its result, the same on
every call, equal to those of one forward holding every component), and chunked runs equal one
forward on every Bridge architecture (each sweep stops after its MLP's block)."""

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
        whole = tl_depass.decompose(model, tokens, spec)
        for logits in ("all", None):
            part = tl_depass.decompose(model, tokens, spec, chunk_size=2, logits=logits)
            for name in part.results:
                atol = tl_depass.completeness_rtol(torch.float64) * whole[name].abs().max().item()
                torch.testing.assert_close(part[name], whole[name], rtol=0, atol=atol,
                                           msg=lambda m, n=name, w=what: f"{w} {n}: {m}")
