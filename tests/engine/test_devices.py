"""A model spread over devices (TransformerLens n_devices, a Bridge with a device_map): every value
the decomposed pass combines is on the device of the layer that uses it.

This machine has one device, so the layer-to-device moves are tested with PyTorch's `meta` device
standing in for a second one (tensors there have shapes and a device, no data: mixing them with
CPU tensors raises as two GPUs would); the whole pass with a model whose config says it is spread
(n_devices=2) but whose layers TransformerLens keeps on the CPU, and with a Bridge over a Hugging
Face model dispatched by accelerate with a device_map (every module's weights offloaded to the CPU
and brought in by accelerate's hooks). docs/datasets.md has the check to run on real GPUs."""

import warnings

import pytest
import torch

import tl_depass
from tl_depass import Heads, Modules, Neurons
from tl_depass.engine import rules
from tl_depass.engine.backends import bridge_class
from tl_depass.engine.clean_run import CleanRun

OTHER = torch.device("meta")  # a second device


@pytest.mark.parametrize("rule", ["softmax", "max"])
def test_rule_statistics_follow_the_mlps_device(rule):
    """The contributors' index and the BOS exclusions are made with the tokens (first device);
    an MLP on another device uses them there."""
    g = torch.randn(5, 2, 3, 4, device=OTHER)  # [slot, batch, pos, d_mlp] at the MLP
    index, excluded = torch.tensor([0, 1, 2, -1, 3]), torch.zeros(5, 2, 3, dtype=torch.bool)
    excluded[0] = True
    facts = rules.NeuronFacts(*(torch.randn(2, 3, 4, device=OTHER) for _ in range(3)))
    total = rules.stats(rule, g, excluded, index, 0.1)
    assert total.top.device == OTHER
    for stats in (None, total):
        out = rules.shares(rule, g, excluded, index, 0.1, facts, stats)
        assert out.device == OTHER and out.shape == g.shape


def test_head_components_are_made_on_their_layers_device():
    tiny = pytest.importorskip("tiny")
    model = tiny.make_model()
    z = torch.randn(2, 5, model.cfg.n_heads, model.cfg.d_head, device=OTHER)
    resid = torch.randn(2, 5, model.cfg.d_model, device=OTHER)
    clean = CleanRun([], {"blocks.1.hook_resid_pre": resid, "blocks.1.attn.hook_z": z}, resid)
    (group,) = Heads([1]).groups(model, clean, torch.zeros(2, 5, dtype=torch.long))
    for entry in group.entries:
        assert entry.rows(0, 3).device == OTHER, entry.hook


def spread(model):
    """`model` as TransformerLens describes one over two devices (the layers stay on the CPU:
    TransformerLens asks for two GPUs before it builds one, and places blocks on the CPU)."""
    model.cfg.n_devices = 2
    return model


@pytest.mark.parametrize("components", ["tokens", Heads(), Modules(), Neurons(1, [0, 3])],
                         ids=["tokens", "heads", "modules", "neurons"])
def test_a_spread_model_is_decomposed_like_one_on_one_device(components):
    tiny = pytest.importorskip("tiny")
    one, two = tiny.make_model(), spread(tiny.make_model())
    tokens = tiny.random_tokens(one, batch=2)
    a = tl_depass.decompose(one, tokens, components, mlp_rule="ratio")
    b = tl_depass.decompose(two, tokens, components, mlp_rule="ratio")
    torch.testing.assert_close(b.logits, a.logits, rtol=0, atol=0)
    for method in ("forward", "backward"):
        x, y = (tl_depass.attribute(m, tokens, components, answer=3, wrong=4, mlp_rule="ratio",
                                    method=method) for m in (one, two))
        torch.testing.assert_close(y.shares, x.shares, rtol=0, atol=0)
        torch.testing.assert_close(y.remainder_shares, x.remainder_shares, rtol=0, atol=0)
    table = tl_depass.run_dataset(two, list(tokens), components, answers=[3, 5], mlp_rule="ratio",
                                  progress=False)
    same = tl_depass.run_dataset(one, list(tokens), components, answers=[3, 5], mlp_rule="ratio",
                                 progress=False)
    assert table.equals(same)


def test_a_bridge_dispatched_by_accelerate_is_decomposed_like_one_without():
    pytest.importorskip("accelerate")
    if bridge_class() is None:
        pytest.skip("this transformer_lens has no TransformerBridge")
    import accelerate
    from bridges import hf_model, make_bridge
    from transformer_lens.model_bridge.sources import build_bridge_from_module

    plain, _ = make_bridge("GPT2LMHeadModel")
    hf = hf_model("GPT2LMHeadModel")  # the same weights (seeded)
    modules = ["transformer.wte", "transformer.wpe", "transformer.drop", "transformer.h.0",
               "transformer.h.1", "transformer.ln_f", "lm_head"]
    accelerate.dispatch_model(hf, device_map=dict.fromkeys(modules, "cpu"), force_hooks=True)
    assert hasattr(hf.transformer.h[1], "_hf_hook")  # accelerate runs every block
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        spread = build_bridge_from_module(hf, "GPT2LMHeadModel", hf_config=hf.config)
    tokens = torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(0))
    for components in ["tokens", Heads(), Modules(), Neurons(1)]:
        for rule, method in [("softmax", "forward"), ("ratio", "backward")]:
            a, b = (tl_depass.attribute(m, tokens, components, answer=3, wrong=4, mlp_rule=rule,
                                        method=method) for m in (plain, spread))
            torch.testing.assert_close(b.shares, a.shares, rtol=0, atol=0)
            torch.testing.assert_close(b.remainder_shares, a.remainder_shares, rtol=0, atol=0)
    prompts = [torch.randint(0, 50, (n,), generator=torch.Generator().manual_seed(n)) for n in (5, 6, 4)]
    for rule in ("softmax", "ratio"):
        a, b = (tl_depass.run_dataset(m, prompts, Heads(), answers=[3, 4, 5], mlp_rule=rule,
                                      progress=False) for m in (plain, spread))
        assert b.equals(a), rule


def test_patterns_are_placed_with_their_layers_z():
    """TransformerLens fires hook_pattern on the padding mask's device (the first) and only then
    moves it to V's: the recorded pattern goes where the layer's z is."""
    from tl_depass.engine.clean_run import place_patterns

    values = {"blocks.1.attn.hook_pattern": torch.rand(2, 4, 5, 5),
              "blocks.1.attn.hook_z": torch.randn(2, 5, 4, 3, device=OTHER),
              "blocks.0.attn.hook_pattern": torch.rand(2, 4, 5, 5),
              "blocks.0.attn.hook_z": torch.randn(2, 5, 4, 3)}
    same = values["blocks.0.attn.hook_pattern"]
    placed = place_patterns(values)
    assert placed["blocks.1.attn.hook_pattern"].device == OTHER
    assert placed["blocks.0.attn.hook_pattern"] is same  # already there: not copied
