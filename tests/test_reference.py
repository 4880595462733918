"""Checks of the reference DePass itself (tests/reference.py), then of the library against it.

The reference must be trustworthy before it judges the library: completeness at every hook,
causality, the ratio rule equal to the linear part of the frozen model (itself checked against
TransformerLens' own forward with every nonlinearity frozen by hooks), known answers for the
split rules and for ignore_bos.
"""

import pytest
import torch
from reference import (
    LAYER_HOOKS,
    act_slope_at_zero,
    frozen_forward,
    reference_depass,
    split_activation,
)
from tiny import GPT2_LIKE, LLAMA_LIKE, make_model, random_tokens
from torch.testing import assert_close

from tl_depass import completeness_rtol
from tl_depass.engine import rules

FAMILIES = {"gpt2": GPT2_LIKE, "llama": LLAMA_LIKE}
RULES = ["softmax", "max", "ratio"]
BOS = 7
REL_ATOL = completeness_rtol(torch.float64)  # relative to the largest |clean value| of the hook


def residual_hooks(model) -> list[str]:
    return [f"blocks.{layer}.{hook}" for layer in range(model.cfg.n_layers) for hook in LAYER_HOOKS]


@torch.no_grad()
def clean_values(model, tokens) -> dict[str, torch.Tensor]:
    logits, cache = model.run_with_cache(tokens)
    hooks = residual_hooks(model) + [f"blocks.{i}.mlp.{h}" for i in range(model.cfg.n_layers)
                                     for h in ("hook_pre", "hook_post")]
    return {**{h: cache[h] for h in hooks}, "logits": logits}


def assert_close_at(actual, expected, hook: str, scale: torch.Tensor | None = None) -> None:
    scale = expected.abs().max() if scale is None else scale
    assert_close(actual, expected, rtol=0, atol=REL_ATOL * float(scale.detach()),
                 msg=lambda m: f"at {hook}: {m}")


# ---------------------------------------------------------------- the reference itself


@pytest.mark.parametrize("bos", [False, True], ids=["no_bos", "bos"])
@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("family", FAMILIES)
def test_completeness(family, rule, bos):
    model = make_model(**FAMILIES[family])
    tokens = random_tokens(model)
    if bos:  # one row with BOS first, one without
        tokens[0, 0] = BOS
    ref = reference_depass(model, tokens, rule=rule, bos_token_id=BOS)
    clean = clean_values(model, tokens)
    assert set(ref) == set(clean)
    for hook, value in clean.items():
        assert ref[hook].shape == (tokens.shape[1] + 1, *value.shape), hook
        assert_close_at(ref[hook].sum(0), value, hook)


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("family", FAMILIES)
def test_causality(family, rule):
    model = make_model(**FAMILIES[family])
    tokens = random_tokens(model)
    for hook, shares in reference_depass(model, tokens, rule=rule).items():
        for p in range(tokens.shape[1]):
            leaked = shares[p, :, :p].abs().max().item() if p else 0.0
            assert leaked == 0, f"token {p} has a share {leaked:.3g} at earlier positions of {hook}"


def hooked_frozen_forward(model, tokens, cache, entry):
    """TransformerLens' own forward from `entry`, with the clean norm scales and patterns replayed
    and each MLP neuron linearised with its clean ratio, all through hooks: an independent check
    of `frozen_forward`."""
    gate_or_pre = {}

    def replay(value):
        return lambda act, hook: value

    def stash_pre(act, hook):
        gate_or_pre[hook.name] = act
        return act

    def linear_post(layer):
        def hook_fn(act, hook):
            name = f"blocks.{layer}.mlp"
            pre_clean, pre_new = cache[f"{name}.hook_pre"], gate_or_pre[f"{name}.hook_pre"]
            if model.cfg.gated_mlp:
                mlp = model.blocks[layer].mlp
                gain = mlp.act_fn(pre_clean) / pre_clean * cache[f"{name}.hook_pre_linear"]
                return pre_new * gain + mlp.b_in
            return pre_new * cache[f"{name}.hook_post"] / pre_clean
        return hook_fn

    hooks = [("blocks.0.hook_resid_pre", replay(entry))]
    hooks += [(name, replay(cache[name])) for name in cache
              if name.endswith(("hook_scale", "hook_pattern"))]
    for layer in range(model.cfg.n_layers):
        hooks += [(f"blocks.{layer}.mlp.hook_pre", stash_pre),
                  (f"blocks.{layer}.mlp.hook_post", linear_post(layer))]
    with torch.no_grad():
        return model.run_with_hooks(tokens, fwd_hooks=hooks)


@pytest.mark.parametrize("family", FAMILIES)
def test_frozen_forward_matches_hooked_transformer_lens(family):
    model = make_model(**FAMILIES[family])
    tokens = random_tokens(model)
    logits, cache = model.run_with_cache(tokens)
    entry = cache["blocks.0.hook_resid_pre"]
    assert_close_at(frozen_forward(model, cache, entry), logits, "logits (clean entry)")
    other = torch.randn(entry.shape, generator=torch.Generator().manual_seed(5), dtype=entry.dtype)
    expected = hooked_frozen_forward(model, tokens, cache, other)
    assert_close_at(frozen_forward(model, cache, other), expected, "logits (random entry)")


@pytest.mark.parametrize("family", FAMILIES)
def test_ratio_shares_are_the_frozen_models_linear_part(family):
    """Zeroing token p's entry state in the frozen model removes exactly its ratio-rule share, and
    the frozen model from a zero entry is the bias component."""
    model = make_model(**FAMILIES[family])
    tokens = random_tokens(model)
    logits, cache = model.run_with_cache(tokens)
    ref = reference_depass(model, tokens, rule="ratio")
    entry = cache["blocks.0.hook_resid_pre"]
    scale = logits.abs().max()
    assert_close_at(frozen_forward(model, cache, torch.zeros_like(entry)), ref["logits"][-1],
                    "logits (zero entry vs bias share)", scale)
    for p in range(tokens.shape[1]):
        without_p = entry.clone()
        without_p[:, p] = 0
        assert_close_at(frozen_forward(model, cache, without_p), logits - ref["logits"][p],
                        f"logits (token {p} removed)", scale)


@pytest.mark.parametrize("family", FAMILIES)
def test_softmax_at_low_temperature_is_max(family):
    model = make_model(**FAMILIES[family])
    tokens = random_tokens(model)
    hard = reference_depass(model, tokens, rule="max")
    soft = reference_depass(model, tokens, rule="softmax", temperature=1e-6)
    for hook in hard:
        scale = hard[hook].sum(0).abs().max()
        assert_close(soft[hook], hard[hook], rtol=0, atol=1e-6 * float(scale),
                     msg=lambda m, hook=hook: f"at {hook}: {m}")


def test_split_activation_known_answers():
    a = torch.tensor([[[3.0]]], dtype=torch.float64)  # batch 1, pos 1, one neuron
    none_excluded = torch.zeros(3, 1, 1, dtype=torch.bool)

    def split(g, rule, excluded=none_excluded, temperature=1.0):
        g = torch.tensor(g, dtype=torch.float64)[:, None, None, None]
        return split_activation(g, a, excluded, rule, temperature).flatten().tolist()

    e1, e2 = torch.e, torch.e**2
    assert split([1.0, 0.0, 2.0], "softmax") == pytest.approx(
        [3 * e1 / (e1 + e2), 0, 3 * e2 / (e1 + e2)])
    assert split([1.0, 0.0, 2.0], "softmax", temperature=0.5) == pytest.approx(
        [3 / (1 + e2), 0, 3 * e2 / (1 + e2)])
    assert split([-1.0, 0.0, -2.0], "max") == [3, 0, 0]  # zero g excluded, even when it is larger
    assert split([2.0, 2.0, 1.0], "max") == [3, 0, 0]  # first one on ties
    assert split([0.0, 0.0, 0.0], "softmax") == [0, 0, 3]  # nobody left: all to bias
    assert split([0.0, 0.0, 0.0], "max") == [0, 0, 3]
    excluded = torch.tensor([True, False, False])[:, None, None]
    assert split([5.0, 0.0, 1.0], "max", excluded) == [0, 0, 3]
    assert split([5.0, 0.0, 0.0], "softmax", excluded) == [0, 0, 3]


@pytest.mark.parametrize("rule", ["softmax", "max"])
def test_library_split_equals_the_reference_split(rule):
    """The engine's rule (engine/rules.shares, written out for speed) against the reference's
    `split_activation` (torch.softmax / argmax), float64: exact zeros, excluded contributors, and
    neurons where nobody is left (every g zero, or every contributor excluded)."""
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(7, 2, 5, 6, generator=gen, dtype=torch.float64)
    g[2] = 0.0  # a contributor that is exactly zero everywhere (a probe)
    g[:, 0, 1, 3] = 0.0  # nobody left at one neuron
    g[:, 1, 2] *= torch.rand(7, 6, generator=gen, dtype=torch.float64) > 0.5  # scattered zeros
    excluded = torch.zeros(7, 2, 5, dtype=torch.bool)
    excluded[0] = True  # BOS-like: one component excluded everywhere
    excluded[:-1, 1, 4] = True  # every component but the bias excluded at one position
    a = torch.randn(2, 5, 6, generator=gen, dtype=torch.float64)
    facts = rules.NeuronFacts(a, torch.zeros_like(a), torch.ones_like(a))
    for temperature in (1.0, 0.1):
        got = rules.shares(rule, g, excluded, torch.arange(7), temperature, facts, None)
        want = split_activation(g, a, excluded, rule, temperature)
        tol = completeness_rtol(torch.float64)
        assert_close(got, want, rtol=tol, atol=tol, msg=lambda m, t=temperature: f"T={t}: {m}")
        assert_close(got.sum(0), a, rtol=tol, atol=tol)
        # chunked as run_chunks does: each chunk's components and the bias, statistics over all
        chunks, index = [[0, 1, 2], [3, 4, 5]], torch.arange(7)
        total = rules.stats(rule, g[6:], excluded[6:], index[6:], temperature)
        for ids in chunks:
            part = rules.stats(rule, g[ids], excluded[ids], index[ids], temperature)
            total = rules.combine(rule, total, part)
        pieces = [rules.shares(rule, g[ids + [6]], excluded[ids + [6]], index[ids + [6]], temperature,
                               facts, total) for ids in chunks]
        chunked = torch.cat([pieces[0], pieces[1][:-1]])[[0, 1, 2, 4, 5, 6, 3]]
        assert_close(chunked, want, rtol=tol, atol=tol, msg=lambda m, t=temperature: f"chunked T={t}: {m}")


@pytest.mark.parametrize("family", FAMILIES)
def test_max_rule_gives_each_neuron_to_one_token(family):
    model = make_model(**FAMILIES[family])
    ref = reference_depass(model, random_tokens(model), rule="max")
    for layer in range(model.cfg.n_layers):
        post = ref[f"blocks.{layer}.mlp.hook_post"]
        # The bias component also carries TL's gated b_in, added after the product.
        owners = (post[:-1] != 0).sum(0) + (post[-1] != 0 if not model.cfg.gated_mlp else 0)
        assert owners.max() <= 1, f"blocks.{layer}.mlp.hook_post"


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("family", FAMILIES)
def test_ignore_bos(family, rule):
    """With BOS first and ignore_bos, token 0 gets no MLP activation at later positions (softmax and
    max); the ratio rule ignores ignore_bos."""
    model = make_model(**FAMILIES[family])
    tokens = random_tokens(model, bos=BOS)
    ignoring = reference_depass(model, tokens, rule=rule, ignore_bos=True, bos_token_id=BOS)
    keeping = reference_depass(model, tokens, rule=rule, ignore_bos=False, bos_token_id=BOS)
    if rule == "ratio":
        for hook in ignoring:
            assert torch.equal(ignoring[hook], keeping[hook]), hook
        return
    for layer in range(model.cfg.n_layers):
        for hook in (f"blocks.{layer}.mlp.hook_post", f"blocks.{layer}.hook_mlp_out"):
            assert torch.all(ignoring[hook][0, :, 1:] == 0), hook
            assert keeping[hook][0, :, 1:].abs().max() > 0, hook
    for hook in ignoring:  # position 0 sees only token 0 and bias: BOS still competes there
        assert torch.equal(ignoring[hook][:, :, 0], keeping[hook][:, :, 0]), hook
    assert ignoring["blocks.0.mlp.hook_post"][0, :, 0].abs().max() > 0
    # Rows without BOS first are untouched.
    other = random_tokens(model)
    assert (other[:, 0] != BOS).all()
    a = reference_depass(model, other, rule=rule, ignore_bos=True, bos_token_id=BOS)
    b = reference_depass(model, other, rule=rule, ignore_bos=False, bos_token_id=BOS)
    assert all(torch.equal(a[h], b[h]) for h in a)
    # A batch mixing both kinds of row: each row as if alone.
    mixed = torch.stack([tokens[0], other[1]])
    both = reference_depass(model, mixed, rule=rule, ignore_bos=True, bos_token_id=BOS)
    for hook in both:
        assert_close_at(both[hook][:, 0], ignoring[hook][:, 0], f"{hook} (BOS row)")
        assert_close_at(both[hook][:, 1], a[hook][:, 1], f"{hook} (row without BOS)")


def test_act_slope_at_zero():
    cases = {"gelu_new": 0.5, "gelu": 0.5, "silu": 0.5, "relu": 0.0}
    for act_fn, slope in cases.items():
        mlp = make_model(act_fn=act_fn).blocks[0].mlp
        assert act_slope_at_zero(mlp.act_fn).item() == pytest.approx(slope, abs=1e-12), act_fn


@pytest.mark.parametrize("rule", RULES)
def test_dead_neuron(rule):
    """A neuron whose pre-activation is exactly 0 (0/0 in the ratio, no contributor in softmax and
    max): finite shares and completeness."""
    for family in FAMILIES.values():
        model = make_model(**family)
        mlp = model.blocks[0].mlp
        with torch.no_grad():
            (mlp.W_gate if model.cfg.gated_mlp else mlp.W_in)[:, 0] = 0
            if not model.cfg.gated_mlp:
                mlp.b_in[0] = 0
        tokens = random_tokens(model)
        ref = reference_depass(model, tokens, rule=rule)
        assert (model.run_with_cache(tokens)[1]["blocks.0.mlp.hook_pre"][..., 0] == 0).all()
        for hook, value in clean_values(model, tokens).items():
            assert torch.isfinite(ref[hook]).all(), hook
            assert_close_at(ref[hook].sum(0), value, hook)


# ---------------------------------------------------------------- the library against it


def library_decompose():
    tl_depass = pytest.importorskip("tl_depass")
    decompose = getattr(tl_depass, "decompose", None)
    if decompose is not None and not callable(decompose):  # the submodule, not the function
        decompose = getattr(decompose, "decompose", None)
    if decompose is None:
        try:
            from tl_depass.decompose import decompose
        except ImportError:
            pytest.skip("tl_depass.decompose does not exist yet")
    return decompose


def run_library(model, tokens, rule, ignore_bos):
    dec = library_decompose()(model, tokens, components="tokens", mlp_rule=rule, temperature=0.1,
                              ignore_bos=ignore_bos, keep=residual_hooks(model), logits="all")
    n_pos = tokens.shape[1]
    assert len(dec.labels) == n_pos + 1 and dec.labels[-1] == "bias", dec.labels
    return {**{h: dec[h] for h in residual_hooks(model)}, "logits": dec.logits}


def assert_library_matches(lib, ref, clean):
    for hook, value in lib.items():
        assert value.shape == ref[hook].shape, f"at {hook}: {value.shape} vs {ref[hook].shape}"
        assert_close_at(value, ref[hook], hook, clean[hook].abs().max())


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("family", FAMILIES)
def test_library_matches_reference(family, rule):
    model = make_model(**FAMILIES[family])
    tokens = random_tokens(model)
    lib = run_library(model, tokens, rule, ignore_bos=True)
    ref = reference_depass(model, tokens, rule=rule, ignore_bos=True, bos_token_id=None)
    assert_library_matches(lib, ref, clean_values(model, tokens))


@pytest.mark.parametrize("family", FAMILIES)
def test_library_matches_reference_with_bos(family):
    """BOS first in one row of two, no tokenizer: the library takes the id as `ignore_bos=<id>`."""
    model = make_model(**FAMILIES[family])
    model.tokenizer = None
    tokens = random_tokens(model)
    tokens[0, 0] = BOS
    clean = clean_values(model, tokens)
    for rule in ("softmax", "max"):
        for lib_flag, ref_flag in ((False, False), (BOS, True)):
            ref = reference_depass(model, tokens, rule=rule, ignore_bos=ref_flag, bos_token_id=BOS)
            assert_library_matches(run_library(model, tokens, rule, lib_flag), ref, clean)
