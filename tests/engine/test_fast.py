"""The folded forward's fast paths (engine/fast.py) and per-entry-layer starts (plan.by_entry_layer):
equal to the full replay to rounding (the fast paths add biases to the bias slot only, where the
full replay adds them to every slot and takes them off the components again), the model left as
found, and the full path kept wherever a skipped hook point is hooked."""

import pytest
import torch

import tl_depass
from tl_depass.engine import fast, plan, sweep
from tl_depass.tolerances import completeness_rtol

tiny = pytest.importorskip("tiny")  # HookedTransformer only (TransformerLens 3.x)

ARCHS = {"gpt2": tiny.GPT2_LIKE, "llama": tiny.LLAMA_LIKE,
         "folded_ln": dict(tiny.GPT2_LIKE, normalization_type="LNPre"),
         "folded_rms": dict(tiny.LLAMA_LIKE, normalization_type="RMSPre")}


def model_of(arch: str, **extra):
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(**dict(ARCHS[arch], dtype=torch.float64, **extra))
    return tiny.randomise(HookedTransformer(cfg), 0).eval()


def decompose_all(model, tokens, components, rule):
    return tl_depass.decompose(model, tokens, components, mlp_rule=rule, chunk_size=None,
                               keep=lambda n: "resid" in n or n.endswith("mlp.hook_pre"))


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("rule", ["softmax", "ratio", "max"])
@pytest.mark.parametrize("components", ["tokens", tl_depass.Neurons(1)], ids=["tokens", "neurons"])
def test_fast_paths_equal_the_full_replay(monkeypatch, arch, rule, components):
    model = model_of(arch)
    tokens = tiny.random_tokens(model, 2, 6)
    quick = decompose_all(model, tokens, components, rule)
    monkeypatch.setattr("tl_depass.engine.replay.fast_paths", lambda *a: fast.FastPaths())
    full = decompose_all(model, tokens, components, rule)
    tol = completeness_rtol(torch.float64)
    for name, value in full.results.items():
        torch.testing.assert_close(quick.results[name], value, rtol=tol, atol=tol * value.abs().max(),
                                   msg=name)
    assert not any("forward" in m.__dict__ for m in model.modules())


@pytest.mark.parametrize("arch", list(ARCHS))
def test_every_module_takes_its_fast_path(arch):
    model = model_of(arch)
    layers = range(model.cfg.n_layers)
    paths = fast.fast_paths(model, [f"blocks.{i}.attn" for i in layers],
                            [(f"blocks.{i}.mlp", f"blocks.{i}.mlp.hook_post") for i in layers],
                            ["blocks.0.ln1", "ln_final"], [])
    assert len(paths.attn) == len(paths.mlps) == model.cfg.n_layers
    assert paths.norms == {"blocks.0.ln1", "ln_final"}


@pytest.mark.parametrize("arch", list(ARCHS))
def test_groups_from_their_entry_layer(monkeypatch, arch):
    """Heads of each layer start at that block: equal to one forward from the tokens up to the
    rounding of matmuls at other batch sizes (float64 completeness tolerance)."""
    model = model_of(arch)
    tokens = tiny.random_tokens(model, 2, 6)
    split = decompose_all(model, tokens, tl_depass.Heads(), "softmax")
    monkeypatch.setattr(sweep, "by_entry_layer", lambda m, c, p: [(list(range(len(p.groups))), p)])
    whole = decompose_all(model, tokens, tl_depass.Heads(), "softmax")
    tol = completeness_rtol(torch.float64)
    for name, value in whole.results.items():
        torch.testing.assert_close(split.results[name], value, rtol=tol, atol=tol, msg=name)


def test_parts_start_at_each_layer():
    model = model_of("gpt2")
    tokens = tiny.random_tokens(model, 1, 5)
    seen = []
    real = plan.by_entry_layer

    def spy(m, c, p):
        parts = real(m, c, p)
        seen.extend((ids, part.start_layer) for ids, part in parts)
        return parts
    sweep_by = sweep.by_entry_layer
    sweep.by_entry_layer = spy
    try:
        tl_depass.decompose(model, tokens, tl_depass.Heads())
    finally:
        sweep.by_entry_layer = sweep_by
    assert seen == [([layer], layer) for layer in range(model.cfg.n_layers)]


def test_hooked_points_keep_the_full_path():
    model = model_of("gpt2")
    with model.hooks(fwd_hooks=[("blocks.0.attn.hook_q", lambda x, hook: None),
                                ("blocks.1.mlp.hook_post", lambda x, hook: None),
                                ("ln_final.hook_scale", lambda x, hook: None)]):
        paths = fast.fast_paths(model, ["blocks.0.attn", "blocks.1.attn"],
                                [("blocks.0.mlp", "blocks.0.mlp.hook_post"),
                                 ("blocks.1.mlp", "blocks.1.mlp.hook_post")],
                                ["blocks.0.ln1", "ln_final"], [])
    assert paths.attn == {"blocks.1.attn"}
    assert paths.mlps == {"blocks.0.mlp"}
    assert paths.norms == {"blocks.0.ln1"}


def test_forward_restored_after_an_exception():
    model = model_of("gpt2")
    paths = fast.FastPaths({"blocks.0.attn"}, {"blocks.0.mlp"}, {"blocks.0.ln1"})
    with pytest.raises(RuntimeError, match="boom"):
        with fast.skipping_frozen(model, paths, lambda attn: lambda v: v, lambda x, b: x):
            assert "forward" in model.blocks[0].attn.__dict__
            raise RuntimeError("boom")
    assert not any("forward" in m.__dict__ for m in model.modules())
