"""The TransformerBridge's fast path (engine/fast_bridge.py) equals the full replay: groups that
start at their entry block, on tiny float64 Bridges with every parameter randomised."""

import pytest
import torch
from bridges import make_bridge

import tl_depass
from tl_depass import completeness_rtol
from tl_depass.engine import bridge_mlp, fast_bridge, replay
from tl_depass.engine.backends import bridge_class

if bridge_class() is None:
    pytest.skip("this transformer_lens has no TransformerBridge", allow_module_level=True)

F64 = completeness_rtol(torch.float64)
TOKENS = torch.randint(0, 61, (2, 7), generator=torch.Generator().manual_seed(1))


def full_replay(monkeypatch, model, *args, **kwargs):
    """decompose with every group run from the tokens (no entry-layer starts)."""
    with monkeypatch.context() as m:
        m.setattr(fast_bridge, "can_start", lambda model: False)
        return tl_depass.decompose(model, *args, **kwargs)


def assert_same(fast, full, what):
    assert fast.labels == full.labels and set(fast.results) == set(full.results)
    for name, value in full.results.items():
        torch.testing.assert_close(fast[name], value, rtol=0, atol=F64 * value.abs().max().item(),
                                   msg=lambda m, n=name: f"{what} {n}: {m}")


def hook_count(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def forwards_restored(model) -> bool:
    return all("forward" not in m.__dict__ for m in model.modules())


@pytest.mark.parametrize("arch", sorted(fast_bridge.STARTS - {"MistralForCausalLM"}))
def test_entry_layer_starts_equal_full_replay(arch, monkeypatch):
    bridge, _ = make_bridge(arch)
    assert fast_bridge.can_start(bridge)
    with torch.no_grad():
        before = bridge(TOKENS)
    hooks = hook_count(bridge)  # after the Bridge's first forward, which adds its own
    cases = [(tl_depass.Heads(), "softmax", None), (tl_depass.Heads(), "max", 3),
             (tl_depass.Modules(), "ratio", None), (tl_depass.Neurons(1), "softmax", 16)]
    for components, rule, chunk in cases:
        options = dict(mlp_rule=rule, logits="all", keep=lambda name: name.endswith("hook_resid_post"))
        fast = tl_depass.decompose(bridge, TOKENS, components, chunk_size=chunk, **options)
        full = full_replay(monkeypatch, bridge, TOKENS, components, **options)
        assert_same(fast, full, f"{arch} {components} {rule} chunk {chunk}")
        for hook, err in fast.completeness_error().items():
            assert err <= F64, f"{arch} {components} {rule}: {hook} off by {err:.1e}"
    assert hook_count(bridge) == hooks, "DePass left hooks on the Bridge"
    assert forwards_restored(bridge)
    with torch.no_grad():
        torch.testing.assert_close(bridge(TOKENS), before, rtol=0, atol=0)


@pytest.mark.parametrize("arch", ["GPT2LMHeadModel", "LlamaForCausalLM"])
def test_chunked_padded_and_compat(arch, monkeypatch):
    """Right padding, chunks and compatibility mode: the same as the full replay."""
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 4:] = 0
    for compat in (False, True):
        bridge, _ = make_bridge(arch, compat=compat)
        for rule in ("softmax", "ratio"):
            options = dict(attention_mask=mask, mlp_rule=rule, logits="last")
            one = tl_depass.decompose(bridge, TOKENS, tl_depass.Heads(), **options)
            chunked = tl_depass.decompose(bridge, TOKENS, tl_depass.Heads(), chunk_size=2, **options)
            full = full_replay(monkeypatch, bridge, TOKENS, tl_depass.Heads(), **options)
            assert_same(one, full, f"{arch} compat={compat} {rule}")
            assert_same(chunked, full, f"{arch} compat={compat} {rule} chunked")


def test_blocks_before_the_entry_never_run():
    bridge, hf = make_bridge("GPT2LMHeadModel")
    calls = []
    handle = bridge.blocks[0].original_component.register_forward_hook(lambda *a: calls.append(1))
    try:
        tl_depass.decompose(bridge, TOKENS, tl_depass.Neurons(1))
    finally:
        handle.remove()
    assert len(calls) == 1, "block 0 ran in the folded forward of a group entering at block 1"


def test_forwards_restored_after_an_exception():
    bridge, _ = make_bridge("LlamaForCausalLM")
    residual = torch.zeros(2, 7, 32, dtype=torch.float64)

    def fail(x, hook):
        raise RuntimeError("boom")
    with pytest.raises(RuntimeError, match="boom"), fast_bridge.starting_at(bridge, 1, residual):
        bridge.run_with_hooks(TOKENS, fwd_hooks=[("blocks.1.hook_resid_pre", fail)])
    assert forwards_restored(bridge)
    with fast_bridge.starting_at(bridge, 1, residual), torch.no_grad():
        _, cache = bridge.run_with_cache(TOKENS, names_filter="blocks.1.hook_resid_pre")
    assert torch.equal(cache["blocks.1.hook_resid_pre"], residual)
    assert forwards_restored(bridge)


def without_skipping(monkeypatch, model, *args, **kwargs):
    """decompose with every activation function and norm statistic evaluated."""
    with monkeypatch.context() as m:
        m.setattr(fast_bridge, "frozen_activations", lambda model, mlps: [])
        m.setattr(fast_bridge, "frozen_norms", lambda model, norms: [])
        m.setattr(fast_bridge, "frozen_ups", lambda *args: [])
        m.setattr(replay, "frozen_attention", lambda model, attn, keep: set())
        return tl_depass.decompose(model, *args, **kwargs)


@pytest.mark.parametrize("arch", ["GPT2LMHeadModel", "GPTJForCausalLM", "GPTNeoXForCausalLM",
                                  "PhiForCausalLM", "LlamaForCausalLM", "Qwen2ForCausalLM",
                                  "Qwen3ForCausalLM", "Gemma2ForCausalLM", "OPTForCausalLM",
                                  "OlmoForCausalLM", "BloomForCausalLM"])
def test_skipped_activations_and_norms_are_bit_identical(arch, monkeypatch):
    bridge, _ = make_bridge(arch)
    mlps = [(f"blocks.{i}.mlp", f"blocks.{i}.mlp.hook_post") for i in range(2)]
    # OPT's MLP is the decoder layer's fc1/fc2, not a module with an activation of its own
    assert len(bridge_mlp.frozen_activations(bridge, mlps)) == (0 if arch == "OPTForCausalLM" else 2)
    norms = [n for n, _ in bridge.named_modules() if n.endswith(("ln1", "ln2", "ln_final"))]
    assert fast_bridge.frozen_attention(bridge, ["blocks.0.attn", "blocks.1.attn"], []) == {
        "blocks.0.attn", "blocks.1.attn"}  # every family
    assert fast_bridge.frozen_norms(bridge, norms) == [bridge.get_submodule(n) for n in norms]
    gated = "gate" in bridge.blocks[0].mlp._modules
    acts = bridge_mlp.frozen_activations(bridge, mlps)
    assert len(bridge_mlp.frozen_ups(bridge, mlps, [], acts)) == (2 if gated else 0)
    cases = [("tokens", "softmax", None), ("tokens", "max", 3), ("tokens", "ratio", None),
             (tl_depass.Neurons(0), "softmax", 16), (tl_depass.Heads(), "softmax", None)]
    for components, rule, chunk in cases:
        options = dict(mlp_rule=rule, chunk_size=chunk, logits="all",
                       keep=lambda name: name.endswith(("hook_post", "hook_resid_post")))
        fast = tl_depass.decompose(bridge, TOKENS, components, **options)
        slow = without_skipping(monkeypatch, bridge, TOKENS, components, **options)
        assert fast.labels == slow.labels and set(fast.results) == set(slow.results)
        for name, value in slow.results.items():
            assert torch.equal(fast[name], value), f"{arch} {components} {rule} {name}"
    assert forwards_restored(bridge)


def test_a_hooked_hook_post_keeps_its_activation():
    bridge, _ = make_bridge("GPT2LMHeadModel")
    seen = []
    bridge.blocks[1].mlp.out.hook_in.add_hook(lambda x, hook: seen.append(x.clone()))
    try:
        mlps = [(f"blocks.{i}.mlp", f"blocks.{i}.mlp.hook_post") for i in range(2)]
        assert bridge_mlp.frozen_activations(bridge, mlps) == [
            bridge.blocks[0].mlp.original_component.act]
        dec = tl_depass.decompose(bridge, TOKENS, logits="all")
    finally:
        bridge.reset_hooks()
    for hook, err in dec.completeness_error().items():
        assert err <= F64, f"{hook} off by {err:.1e}"
    # every value the user's hook saw is a real activation (the clean run's, or a folded slot's)
    assert all(torch.isfinite(x).all() for x in seen) and len(seen) >= 2


def test_a_hooked_pattern_keeps_its_attention():
    bridge, _ = make_bridge("GPT2LMHeadModel")
    attn = ["blocks.0.attn", "blocks.1.attn"]
    assert fast_bridge.frozen_attention(bridge, attn, ["blocks.1.attn.hook_pattern"]) == {"blocks.0.attn"}
    seen = []
    bridge.blocks[0].attn.hook_pattern.add_hook(lambda x, hook: seen.append(x.shape))
    try:
        assert fast_bridge.frozen_attention(bridge, attn, []) == {"blocks.1.attn"}
        dec = tl_depass.decompose(bridge, TOKENS, tl_depass.Heads(), logits="all")
    finally:
        bridge.reset_hooks()
    for hook, err in dec.completeness_error().items():
        assert err <= F64, f"{hook} off by {err:.1e}"
    assert len(seen) >= 2  # the clean run and the folded forward computed block 0's pattern


def test_fast_attention_never_computes_the_pattern(monkeypatch):
    from transformer_lens.model_bridge.generalized_components.joint_qkv_attention import (
        JointQKVAttentionBridge,
    )

    bridge, _ = make_bridge("GPT2LMHeadModel")
    calls, reconstruct = [], JointQKVAttentionBridge._reconstruct_attention

    def counted(self, *args, **kwargs):
        calls.append(self)
        return reconstruct(self, *args, **kwargs)
    monkeypatch.setattr(JointQKVAttentionBridge, "_reconstruct_attention", counted)
    tl_depass.decompose(bridge, TOKENS, mlp_rule="ratio")
    assert len(calls) == 2, "the folded forward computed an attention pattern"  # the clean run's


@pytest.mark.parametrize("arch", ["OPTForCausalLM", "GPTJForCausalLM"])
def test_opaque_attention_never_computes_queries(arch):
    """OPT's and GPT-J's `AttentionBridge` delegates to Hugging Face's forward; the folded forward
    replaces it with V -> the frozen pattern -> the output projection (`fast_bridge.PLAIN_HF`)."""
    bridge, _ = make_bridge(arch)
    rows = []
    handle = bridge.blocks[1].attn.q.original_component.register_forward_hook(
        lambda module, args, out: rows.append(args[0].shape[0]))
    try:
        dec = tl_depass.decompose(bridge, TOKENS, tl_depass.Heads(), logits="all")
    finally:
        handle.remove()
    assert rows == [TOKENS.shape[0]], rows  # the clean run's only
    for hook, err in dec.completeness_error().items():
        assert err <= F64, f"{hook} off by {err:.1e}"


def test_a_gated_mlp_skips_its_up_projection_unless_it_is_kept():
    """The rules read the clean up projection: the folded forward never computes its own (the
    clean run does, once); a kept `hook_pre_linear` keeps it, with complete shares."""
    bridge, _ = make_bridge("LlamaForCausalLM")
    rows = []
    handle = bridge.blocks[1].mlp._modules["in"].original_component.register_forward_hook(
        lambda module, args, out: rows.append(args[0].shape[0]))
    try:
        tl_depass.decompose(bridge, TOKENS, mlp_rule="softmax")
        assert rows == [TOKENS.shape[0]], rows  # the clean run's only
        rows.clear()
        dec = tl_depass.decompose(bridge, TOKENS, keep=["blocks.1.mlp.hook_pre_linear"], logits="all")
        assert len(rows) == 2, rows  # the clean run and the folded forward
    finally:
        handle.remove()
    mlps = [("blocks.1.mlp", "blocks.1.mlp.hook_post")]
    acts = bridge_mlp.frozen_activations(bridge, mlps)
    assert bridge_mlp.frozen_ups(bridge, mlps, ["blocks.1.mlp.hook_pre_linear"], acts) == []
    for hook, err in dec.completeness_error().items():
        assert err <= F64, f"{hook} off by {err:.1e}"
