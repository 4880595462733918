"""Neuron groups start after their block on the TransformerBridge too (bridge_mlp.output_half,
through.after_mlp): block L runs for the rest, probe and bias alone and each neuron's share of the
MLP output comes from its row, as on the HookedTransformer (tests/engine/test_fast_mlp_entry.py).
Equal to the full replay to the float64 completeness tolerance, every rule, kept hooks inside
block L, padding, chunks, the last layer; the full replay where it does not apply."""

import pytest
import torch
from bridges import CONFIGS, make_bridge
from counting import mlp_entry_and_full

import tl_depass
from tl_depass.engine import bridge_mlp, plan
from tl_depass.engine.backends import bridge_class
from tl_depass.engine.clean_run import record_clean_run
from tl_depass.levels.units import MLPByPosition, Neurons

if bridge_class() is None:
    pytest.skip("this transformer_lens has no TransformerBridge", allow_module_level=True)

F64 = tl_depass.completeness_rtol(torch.float64)
TOKENS = torch.randint(0, 61, (2, 7), generator=torch.Generator().manual_seed(1))
INSIDE = ("hook_resid_pre", "hook_attn_out", "hook_resid_mid", "mlp.hook_pre", "mlp.hook_post",
          "mlp.out.hook_out", "hook_mlp_out", "hook_resid_post")


def both(monkeypatch, model, components, **options):
    """(new path, full replay) of one call, checking that the new path was taken."""
    return mlp_entry_and_full(monkeypatch, model, TOKENS, components, **options)


def assert_same(quick, full, what):
    assert quick.labels == full.labels and quick.results.keys() == full.results.keys()
    for name, value in full.results.items():
        torch.testing.assert_close(quick[name], value, rtol=0, atol=F64 * max(value.abs().max().item(), 1),
                                   msg=lambda m, n=name: f"{what} {n}: {m}")


@pytest.mark.parametrize("arch", sorted(bridge_mlp.SEQUENTIAL - {"MistralForCausalLM"} | bridge_mlp.PARALLEL))
@pytest.mark.parametrize("layer", [0, 1])
def test_neurons_equal_the_full_replay(monkeypatch, arch, layer):
    bridge, _ = make_bridge(arch)
    mask = torch.ones_like(TOKENS)
    mask[1, 5:] = 0  # right padding
    inside = [f"blocks.{i}.{h}" for i in range(layer, 2) for h in INSIDE]
    for rule, chunk in (("softmax", None), ("max", 20), ("ratio", None)):
        for keep in ([n for n in inside if n in bridge.hook_dict],  # rows built (no resid_mid: parallel)
                     [f"blocks.{i}.hook_resid_post" for i in range(layer, 2)]):  # a_i W_out[i]
            quick, full = both(monkeypatch, bridge, Neurons(layer), mlp_rule=rule, chunk_size=chunk,
                               attention_mask=mask, keep=keep, logits="all")
            assert_same(quick, full, f"{arch} L{layer} {rule} chunk {chunk} keep {len(keep)}")
            for hook, err in quick.completeness_error().items():
                assert err <= F64, f"{arch} L{layer} {rule}: {hook} off by {err:.1e}"


def test_block_l_runs_for_three_slots_and_chosen_neurons(monkeypatch):
    """Block L's MLP input runs for the rest, probe and bias only; chosen neurons and
    MLPByPosition take the same path."""
    bridge, _ = make_bridge("LlamaForCausalLM")
    rows = []
    handle = bridge.blocks[1].mlp.gate.original_component.register_forward_hook(
        lambda module, args, out: rows.append(args[0].shape[0]))
    try:
        quick, full = both(monkeypatch, bridge, Neurons(1, [3, 0, 7, 11, 2]), mlp_rule="softmax")
        assert rows[1] == 3 * TOKENS.shape[0], rows  # after the clean run: rest, probe, bias
    finally:
        handle.remove()
    assert_same(quick, full, "chosen neurons")
    assert_same(*both(monkeypatch, bridge, MLPByPosition((0, 1)), mlp_rule="softmax", chunk_size=3),
                "MLPByPosition")


def test_falls_back_where_it_does_not_apply(monkeypatch):
    """A user's hook in block L, norms after the MLP (Gemma2), OPT's MLP in the decoder layer,
    GPT-NeoX's sequential residual (`use_parallel_residual=False`): the full replay."""
    def entry(bridge):
        clean = record_clean_run(bridge, TOKENS, None, lambda n: True)
        return plan.mlp_output_entry(bridge, clean, Neurons(1).groups(bridge, clean, TOKENS))

    bridge, _ = make_bridge("GPT2LMHeadModel")
    assert entry(bridge) is not None
    with bridge.hooks(fwd_hooks=[("blocks.1.hook_mlp_out", lambda x, hook: x)]):
        assert entry(bridge) is None
    for arch in ("Gemma2ForCausalLM", "OPTForCausalLM"):
        assert entry(make_bridge(arch)[0]) is None, arch
    assert entry(make_bridge("GPTNeoXForCausalLM")[0]) is not None  # parallel: applies
    name, fields = CONFIGS["GPTNeoXForCausalLM"]
    monkeypatch.setitem(CONFIGS, "GPTNeoXForCausalLM", (name, dict(fields, use_parallel_residual=False)))
    assert entry(make_bridge("GPTNeoXForCausalLM")[0]) is None
