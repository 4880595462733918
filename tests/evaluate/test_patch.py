"""The one patcher: units folded into the batch equal one forward per unit with a hand-written
hook; frozen and plain head ablation equal the hook-by-hook functions they replaced; no hook is
left on the model, also when a patch, a metric or the caller's code raises."""

import warnings

import pytest
import torch

from tl_depass import DepassError, compare
from tl_depass.engine.clean_run import record_clean_run
from tl_depass.engine.frozen import FROZEN_INPUTS, frozen_hooks
from tl_depass.evaluate import patch
from tl_depass.evaluate.metrics import logit_diff

ANSWERS, WRONG = torch.tensor([3, 11, 17]), torch.tensor([5, 2, 9])


def no_hooks(model) -> bool:
    return all(not h._forward_hooks and not h._backward_hooks for h in model.hook_dict.values())


@pytest.fixture(scope="module", params=["hooked", "bridge"])
def model(request):
    if request.param == "hooked":
        return pytest.importorskip("tiny").make_model()
    from tl_depass.engine.backends import bridge_class

    if bridge_class() is None:
        pytest.skip("this transformer_lens has no TransformerBridge")
    from bridges import make_bridge

    return make_bridge("GPT2LMHeadModel", compat=True)[0]


@pytest.fixture(scope="module")
def tokens(model):
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, min(model.cfg.d_vocab, 20), (3, 8), generator=g)


def one_at_a_time(model, tokens, name, at, value, metric):
    """The reference: one forward, one hand-written hook setting activation[at] = value[at]."""
    def hook(x, hook):
        x = x.clone()
        x[at] = 0 if value is None else value[at]
        return x
    with torch.no_grad():
        return metric(model.run_with_hooks(tokens, fwd_hooks=[(name, hook)]))


@pytest.mark.parametrize("chunk", [1, 3, 64])
def test_units_folded_into_the_batch_equal_one_forward_each(model, tokens, chunk):
    metric = logit_diff(ANSWERS, WRONG)
    z, post = "blocks.1.attn.hook_z", "blocks.0.mlp.hook_post"
    _, cache = model.run_with_cache(tokens.flip(0))  # another run's activations as sources
    units = [patch.head(1, 2), patch.Patch(z, (slice(None), 0), cache[z]),
             patch.neuron(0, 7, cache[post]), patch.Patch(post, (4, 3)),  # neuron 3 at position 4
             patch.Patch("blocks.1.hook_resid_pre", (2,), cache["blocks.1.hook_resid_pre"])]
    got = patch.patch_each(model, tokens, units, metric, chunk=chunk)
    want = torch.stack([
        one_at_a_time(model, tokens, z, (slice(None), slice(None), 2), None, metric),
        one_at_a_time(model, tokens, z, (slice(None), slice(None), 0), cache[z], metric),
        one_at_a_time(model, tokens, post, (Ellipsis, 7), cache[post], metric),
        one_at_a_time(model, tokens, post, (slice(None), 4, 3), None, metric),
        one_at_a_time(model, tokens, "blocks.1.hook_resid_pre", (slice(None), 2),
                      cache["blocks.1.hook_resid_pre"], metric)])
    torch.testing.assert_close(got, want)
    assert no_hooks(model)


def test_patches_together_and_gradients(model, tokens):
    """`run` applies several patches in one forward (top-k ablation), and gradients flow
    through a replaced activation."""
    def zero(z, hook, heads):
        z = z.clone()
        z[:, :, heads] = 0
        return z
    with torch.no_grad():
        want = model.run_with_hooks(tokens, fwd_hooks=[
            ("blocks.0.attn.hook_z", lambda z, hook: zero(z, hook, [1, 3])),
            ("blocks.1.attn.hook_z", lambda z, hook: zero(z, hook, [2]))])
        got = patch.run(model, tokens, [patch.head(0, 1), patch.head(1, 2), patch.head(0, 3)])
    torch.testing.assert_close(got, want)
    _, cache = model.run_with_cache(tokens)
    x = cache["blocks.0.hook_resid_pre"].detach().clone().requires_grad_(True)
    logits = patch.run(model, tokens, [patch.Patch("blocks.0.hook_resid_pre", (), x)])
    torch.testing.assert_close(logits.detach(), model(tokens).detach())
    (grad,) = torch.autograd.grad(logit_diff(ANSWERS, WRONG)(logits), x)
    assert grad.abs().sum() > 0
    assert no_hooks(model)


def old_zero_ablation(model, tokens, metric, frozen):
    """compare.zero_ablation before the patcher: one forward per head, its own hook."""
    clean = record_clean_run(model, tokens, None, lambda n: n.endswith(FROZEN_INPUTS))
    hooks = frozen_hooks(model, clean) if frozen else []
    base = metric(clean.logits)
    out = torch.zeros(model.cfg.n_layers, model.cfg.n_heads, dtype=base.dtype)
    with torch.no_grad():
        for layer in range(model.cfg.n_layers):
            for head in range(model.cfg.n_heads):
                def ablate(z, hook, head=head):
                    z = z.clone()
                    z[:, :, head] = 0
                    return z
                logits = model.run_with_hooks(
                    tokens, fwd_hooks=hooks + [(f"blocks.{layer}.attn.hook_z", ablate)])
                out[layer, head] = base - metric(logits)
    return out


def test_frozen_and_plain_ablation_equal_the_old_functions(model, tokens):
    metric = logit_diff(ANSWERS, WRONG)
    frozen = compare.frozen_ablation(model, tokens, metric)
    plain = compare.plain_ablation(model, tokens, metric)
    # the same forwards as before, so the same numbers to the last bit
    torch.testing.assert_close(frozen, old_zero_ablation(model, tokens, metric, frozen=True),
                               rtol=0, atol=0)
    torch.testing.assert_close(plain, old_zero_ablation(model, tokens, metric, frozen=False),
                               rtol=0, atol=0)
    assert not torch.allclose(frozen, plain)  # the two really differ on this model
    for flag, want in [(True, frozen), (False, plain)]:  # the old flag: same numbers, a warning
        with pytest.warns(DeprecationWarning, match="frozen_ablation" if flag else "plain_ablation"):
            torch.testing.assert_close(compare.zero_ablation(model, tokens, metric, frozen=flag), want)
    assert no_hooks(model)


def test_no_hooks_left_after_an_exception(model, tokens):
    metric = logit_diff(ANSWERS, WRONG)
    wrong_shape = torch.zeros(3, 7, model.cfg.n_heads, model.cfg.d_head, dtype=model.cfg.dtype)
    with pytest.raises(DepassError, match=r"blocks\.1\.attn\.hook_z.*same shape"):  # in a hook
        patch.patch_each(model, tokens, [patch.head(0, 1), patch.head(1, 2, wrong_shape)], metric)
    assert no_hooks(model)

    def broken(logits):
        raise RuntimeError("a metric that fails")
    with pytest.raises(RuntimeError, match="a metric that fails"):
        patch.patch_each(model, tokens, [patch.head(0, 1)], broken)
    assert no_hooks(model)
    with pytest.raises(KeyError), patch.patched(model, [[patch.head(0, 1), patch.neuron(1, 2)]]):
        assert not no_hooks(model)  # inside, the hooks are there
        raise KeyError("the caller's code fails")
    assert no_hooks(model)
    with pytest.raises(DepassError, match="chunk"):
        patch.patch_each(model, tokens, [patch.head(0, 1)], metric, chunk=0)


def test_frozen_ablation_leaves_no_hooks_when_the_metric_fails(model, tokens):
    calls = []

    def fails_on_the_third_call(logits):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("third call")
        return logits[:, -1, 3].sum()
    for ablation in (compare.frozen_ablation, compare.plain_ablation):
        calls.clear()
        with pytest.raises(RuntimeError, match="third call"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ablation(model, tokens, fails_on_the_third_call)
        assert no_hooks(model)
