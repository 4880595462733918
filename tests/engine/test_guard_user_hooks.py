"""The user's own hooks: refused where DePass sets the value itself, honoured everywhere else.

Honoured means: the clean run is the model as the user's hooks make it (its logits are what the
hooked model returns), and the decomposition is complete with respect to that clean run."""

import pytest
import torch

import tl_depass
from tl_depass import compare, completeness_rtol
from tl_depass.engine.backends import bridge_class

F64 = completeness_rtol(torch.float64)
FIX = "remove it, or fold its effect into the model"


@pytest.fixture
def models():
    return pytest.importorskip("tiny")  # skips where TransformerLens has no HookedTransformer


def hook_count(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def doubled(x, hook):
    return 2 * x


def calls(model, tokens):
    """Every public entry point that runs the model with DePass's hooks."""
    return {
        "decompose": lambda: tl_depass.decompose(model, tokens),
        "decompose Heads": lambda: tl_depass.decompose(model, tokens, tl_depass.Heads()),
        "attribute backward": lambda: tl_depass.attribute(
            model, tokens, tl_depass.Heads(), answer=3, mlp_rule="ratio", method="backward"),
        "attribute forward": lambda: tl_depass.attribute(model, tokens, answer=3, method="forward"),
        "frozen_ablation": lambda: compare.frozen_ablation(model, tokens, lambda x: x[:, -1, 3].sum()),
    }


def assert_refused(model, tokens, hook: str, name: str) -> None:
    for call, run in calls(model, tokens).items():
        with pytest.raises(tl_depass.DepassError, match=name) as e:
            run()
        assert FIX in str(e.value), f"{call}: the message does not say how to fix it: {e.value}"


@pytest.mark.parametrize("how", ["model.hooks", "add_hook"])
def test_a_hook_at_hook_z_is_refused(models, how):
    model = models.make_model()
    tokens = models.random_tokens(model)
    if how == "add_hook":
        model.blocks[1].attn.hook_z.add_hook(doubled)
        assert_refused(model, tokens, "blocks.1.attn.hook_z", r"blocks\.1\.attn\.hook_z")
        assert hook_count(model) == 1, "the user's hook was removed, or ours were left behind"
        model.reset_hooks()
    else:
        with model.hooks(fwd_hooks=[("blocks.1.attn.hook_z", doubled)]):
            assert_refused(model, tokens, "blocks.1.attn.hook_z", r"blocks\.1\.attn\.hook_z")
            assert hook_count(model) == 1
    assert hook_count(model) == 0


def test_a_hook_at_a_gated_mlp_activation_is_refused(models):
    """A gated MLP's activation is rebuilt as act_fn(gate) * up: a hook at hook_post is skipped."""
    model = models.make_model(**{k: v for k, v in models.LLAMA_LIKE.items() if k != "seed"})
    tokens = models.random_tokens(model)
    with model.hooks(fwd_hooks=[("blocks.0.mlp.hook_post", doubled)]):
        assert_refused(model, tokens, "blocks.0.mlp.hook_post", r"blocks\.0\.mlp\.hook_post")
    assert hook_count(model) == 0


def scale_embed(x, hook):
    return 1.5 * x


def zero_head_2(pattern, hook):
    pattern = pattern.clone()
    pattern[:, 2] = 0
    return pattern


def zero_neuron_5(post, hook):
    post = post.clone()
    post[..., 5] = 0
    return post


def drop_direction(x, hook):  # linear: project out the first basis direction
    x = x.clone()
    x[..., 0] = 0
    return x


def shift_values(v, hook):  # affine: DePass's bias correction at hook_v takes the constant
    return 0.5 * v + 0.1


HONOURED = {
    "hook_embed": scale_embed,
    "blocks.0.attn.hook_pattern": zero_head_2,
    "blocks.1.mlp.hook_post": zero_neuron_5,
    "blocks.1.attn.hook_v": shift_values,
    "blocks.0.hook_resid_mid": drop_direction,
    "blocks.1.ln2.hook_scale": scale_embed,
}


@pytest.mark.parametrize("hook", list(HONOURED))
def test_hooks_elsewhere_are_honoured(models, hook):
    model = models.make_model()
    tokens = models.random_tokens(model)
    plain = model(tokens)
    with model.hooks(fwd_hooks=[(hook, HONOURED[hook])]):
        hooked = model(tokens)
        assert (hooked - plain).abs().max() > 1e-3, "the test hook changes nothing"
        for components in ["tokens", tl_depass.Heads(), tl_depass.Neurons(1)]:
            dec = tl_depass.decompose(model, tokens, components, keep=lambda n: True)
            torch.testing.assert_close(dec.clean_logits, hooked, rtol=0, atol=0,
                                       msg=lambda m: f"{hook}: the clean run is not the hooked model: {m}")
            for name, err in dec.completeness_error().items():
                assert err <= F64, f"{hook} {components}: {name} off by {err:.1e}"
            # attribute's two paths (folded forward; backward through the frozen model) agree
            scores = {method: tl_depass.attribute(model, tokens, components, answer=3, wrong=4,
                                                  mlp_rule="ratio", method=method).scores
                      for method in ("forward", "backward")}
            models.close(scores["backward"], scores["forward"], f"{hook} {components} backward")
        assert hook_count(model) == 1
    assert hook_count(model) == 0


def test_honoured_hooks_mean_what_they_say(models):
    """An ablated head or neuron is a component that contributes exactly nothing."""
    model = models.make_model()
    tokens = models.random_tokens(model)
    with model.hooks(fwd_hooks=[("blocks.0.attn.hook_pattern", zero_head_2),
                                ("blocks.1.mlp.hook_post", zero_neuron_5)]):
        heads = tl_depass.decompose(model, tokens, tl_depass.Heads([0]))
        neurons = tl_depass.decompose(model, tokens, tl_depass.Neurons(1))
        scores = tl_depass.attribute(model, tokens, tl_depass.Heads([0]), answer=3,
                                     mlp_rule="ratio", method="backward").scores
    zero = torch.zeros_like(heads.logits[0])
    torch.testing.assert_close(heads.logits[heads.index("L0H2")], zero, rtol=0, atol=0)
    torch.testing.assert_close(neurons.logits[neurons.index("L1N5")], zero, rtol=0, atol=0)
    torch.testing.assert_close(scores[:, 2], torch.zeros_like(scores[:, 2]), rtol=0, atol=0)


def test_a_recording_hook_changes_nothing(models):
    model = models.make_model()
    tokens = models.random_tokens(model)
    want = tl_depass.decompose(model, tokens, tl_depass.Heads())
    seen = []
    with model.hooks(fwd_hooks=[("blocks.1.attn.hook_z", lambda z, hook: seen.append(z.shape[0])),
                                ("blocks.1.hook_resid_mid", lambda x, hook: seen.append(x.shape[0]))]):
        with pytest.raises(tl_depass.DepassError, match=r"blocks\.1\.attn\.hook_z"):
            tl_depass.decompose(model, tokens, tl_depass.Heads())  # it cannot tell it only records
    with model.hooks(fwd_hooks=[("blocks.1.hook_resid_mid", lambda x, hook: seen.append(x.shape[0]))]):
        dec = tl_depass.decompose(model, tokens, tl_depass.Heads())
    assert tokens.shape[0] in seen, "the user's recording hook did not see the clean run"
    for name, value in want.results.items():
        torch.testing.assert_close(dec[name], value, rtol=0, atol=0, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("hook, fn", [
    ("blocks.0.hook_resid_mid", lambda x, hook: x + 0.1),  # affine on the residual stream
    ("blocks.1.hook_attn_out", lambda x, hook: torch.tanh(x)),  # non-linear
])
def test_hooks_that_break_completeness_are_refused(models, hook, fn):
    model = models.make_model()
    tokens = models.random_tokens(model)
    with model.hooks(fwd_hooks=[(hook, fn)]), pytest.raises(tl_depass.DepassError, match="linear"):
        tl_depass.decompose(model, tokens)
    assert hook_count(model) == 0


# --- TransformerBridge (TL 3.9 and 4.x) ---

@pytest.fixture
def bridge():
    if bridge_class() is None:
        pytest.skip("this transformer_lens has no TransformerBridge")
    from bridges import make_bridge

    bridge, _ = make_bridge("GPT2LMHeadModel")
    tokens = torch.randint(0, 61, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        bridge(tokens)  # its first forward adds the Bridge's own hooks to the Hugging Face model
    own = hook_count(bridge)
    yield bridge, tokens
    assert hook_count(bridge) == own, "hooks were left on the Bridge"


@pytest.mark.parametrize("name", ["blocks.1.attn.hook_z", "blocks.1.attn.o.hook_in"])
def test_bridge_hook_at_hook_z_is_refused_under_either_name(bridge, name):
    model, tokens = bridge
    with model.hooks(fwd_hooks=[(name, doubled)]):
        assert_refused(model, tokens, "blocks.1.attn.hook_z", r"blocks\.1\.attn\.hook_z")


@pytest.mark.parametrize("hook", ["hook_embed", "blocks.1.mlp.hook_post", "blocks.0.hook_resid_mid"])
def test_bridge_hooks_elsewhere_are_honoured(bridge, hook):
    model, tokens = bridge
    fn = {"hook_embed": scale_embed, "blocks.1.mlp.hook_post": zero_neuron_5}.get(hook, drop_direction)
    with torch.no_grad():
        plain = model(tokens)
    with model.hooks(fwd_hooks=[(hook, fn)]):
        with torch.no_grad():
            hooked = model(tokens)
        assert (hooked - plain).abs().max() > 1e-3, "the test hook changes nothing"
        for components in ["tokens", tl_depass.Heads(), tl_depass.Neurons(1)]:
            dec = tl_depass.decompose(model, tokens, components)
            atol = F64 * hooked.abs().max().item()
            torch.testing.assert_close(dec.clean_logits, hooked, rtol=F64, atol=atol,
                                       msg=lambda m: f"{hook}: the clean run is not the hooked model: {m}")
            for name, err in dec.completeness_error().items():
                assert err <= F64, f"{hook} {components}: {name} off by {err:.1e}"


def test_a_bridges_own_hooks_are_not_the_users():
    """TL 4's OPT adapter forwards hook points to others with permanent hooks of its own."""
    if bridge_class() is None:
        pytest.skip("this transformer_lens has no TransformerBridge")
    from bridges import make_bridge

    from tl_depass.engine.guard import user_hooks

    model, _ = make_bridge("OPTForCausalLM")
    assert user_hooks(model) == {}, "the Bridge's own wiring was taken for the user's hooks"
    with model.hooks(fwd_hooks=[("blocks.0.hook_mlp_out", doubled)]):
        assert user_hooks(model) == {"blocks.0.hook_mlp_out": 1}
