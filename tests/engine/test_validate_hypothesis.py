"""Property-based bad input: whatever bad tokens, components or options hypothesis draws, the
public API raises DepassError with a short message, and the model is left as it was (same
parameters, no hooks, same output)."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tl_depass
from tl_depass import DepassError, Heads, Modules, Neurons, TokensAt
from tl_depass.engine.backends import canonical_names, hooked_class
from tl_depass.engine.rules import RULES

LIMIT = 300
SETTINGS = settings(max_examples=60, deadline=None, derandomize=True, database=None)


def make():
    if hooked_class() is not None:
        from tiny import make_model

        return make_model()
    from bridges import make_bridge

    bridge = make_bridge("GPT2LMHeadModel")[0]
    with torch.no_grad():  # the Bridge adds its own norm pre-hooks on its first forward
        bridge(torch.zeros(1, 2, dtype=torch.long))
    return bridge


def hook_count(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


class State:
    def __init__(self):
        self.model = make()
        g = torch.Generator().manual_seed(1)
        self.tokens = torch.randint(0, self.model.cfg.d_vocab, (2, 5), generator=g)
        self.params = {n: p.detach().clone() for n, p in self.model.named_parameters()}
        self.hooks = hook_count(self.model)
        with torch.no_grad():
            self.out = self.model(self.tokens)


@pytest.fixture(scope="module")
def state():
    return State()


CALLS = {  # entry point -> a call with keyword overrides
    "decompose": lambda m, t, spec, kw: tl_depass.decompose(m, t, spec, **kw),
    "attribute": lambda m, t, spec, kw: tl_depass.attribute(m, t, spec, answer=3, **kw),
    "attribute backward": lambda m, t, spec, kw: tl_depass.attribute(
        m, t, spec, answer=3, **{"mlp_rule": "ratio", "method": "backward", **kw}),
}
entry = st.sampled_from(sorted(CALLS))


def assert_refused(state: State, call, what: str) -> None:
    with pytest.raises(DepassError) as info:
        call()
    msg = str(info.value)
    assert 0 < len(msg) < LIMIT, f"{what}: a {len(msg)}-character message: {msg[:400]}"
    model = state.model
    assert hook_count(model) == state.hooks, f"{what}: hooks left on the model"
    for n, p in model.named_parameters():
        assert torch.equal(p, state.params[n]), f"{what}: parameter {n} changed"
    with torch.no_grad():
        torch.testing.assert_close(model(state.tokens), state.out, rtol=0, atol=0,
                                   msg=lambda m: f"{what}: the model's output changed: {m}")


@st.composite
def bad_tokens(draw, d_vocab: int, n_ctx: int):
    kind = draw(st.sampled_from(["negative", "too large", "float", "ndim", "empty", "too long"]))
    base = torch.tensor(draw(st.lists(st.lists(st.integers(0, d_vocab - 1), min_size=3, max_size=3),
                                      min_size=1, max_size=2)))
    if kind == "negative":
        base[0, draw(st.integers(0, 2))] = draw(st.integers(-10**6, -1))
    elif kind == "too large":
        base[-1, draw(st.integers(0, 2))] = draw(st.integers(d_vocab, 10**6))
    elif kind == "float":
        base = base.to(draw(st.sampled_from([torch.float32, torch.float64, torch.bool])))
    elif kind == "ndim":
        base = draw(st.sampled_from([base[None], base[0, 0], base[None, None]]))
    elif kind == "empty":
        base = draw(st.sampled_from([base[:, :0], base[:0]]))
    else:
        base = torch.zeros(1, n_ctx + draw(st.integers(1, 5)), dtype=torch.long)
    return kind, base


@SETTINGS
@given(data=st.data(), how=entry)
def test_bad_tokens_are_refused(state, data, how):
    cfg = state.model.cfg
    kind, tokens = data.draw(bad_tokens(cfg.d_vocab, cfg.n_ctx))
    assert_refused(state, lambda: CALLS[how](state.model, tokens, "tokens", {}),
                   f"{how} with {kind} tokens {tuple(tokens.shape)}")


def bad_ids(n: int):
    """Lists of indices in [0, n) with one problem: empty, negative, too large or repeated."""
    good = st.lists(st.integers(0, n - 1), min_size=1, max_size=3, unique=True)
    return st.one_of(
        st.just([]),
        st.tuples(good, st.integers(-10**9, -1)).map(lambda p: p[0] + [p[1]]),
        st.tuples(good, st.integers(n, 10**9)).map(lambda p: [p[1]] + p[0]),
        good.map(lambda ids: ids + ids[:1]),
    )


@st.composite
def bad_components(draw, n_layers: int, d_mlp: int):
    """(level, its arguments): built in the test, as beartype's checks of a level's fields use
    the random module, which hypothesis does not allow inside a strategy."""
    kind = draw(st.sampled_from(["neurons", "neuron layer", "heads", "modules", "tokens at"]))
    bad_layer = st.one_of(st.integers(-10**6, -1), st.integers(n_layers, 10**6))
    if kind == "neurons":
        return Neurons, (draw(st.integers(0, n_layers - 1)), draw(bad_ids(d_mlp)))
    if kind == "neuron layer":
        return Neurons, (draw(bad_layer),)
    if kind == "heads":
        return Heads, (draw(bad_ids(n_layers)),)
    if kind == "modules":
        return Modules, (draw(bad_ids(n_layers)),)
    return TokensAt, (draw(bad_layer),)


@SETTINGS
@given(data=st.data(), how=entry)
def test_bad_components_are_refused(state, data, how):
    level, args = data.draw(bad_components(state.model.cfg.n_layers, state.model.cfg.d_mlp))
    spec = level(*args)
    assert_refused(state, lambda: CALLS[how](state.model, state.tokens, spec, {}), f"{how} {spec}")


@st.composite
def bad_options(draw, hooks: set[str]):
    kind = draw(st.sampled_from(["chunk_size", "temperature", "mlp_rule", "keep", "ignore_bos"]))
    if kind == "chunk_size":
        return {"chunk_size": draw(st.integers(-10**6, 0))}
    if kind == "temperature":
        return {"temperature": draw(st.one_of(
            st.floats(max_value=0.0, allow_nan=False), st.integers(-100, 0),
            st.sampled_from([math.nan, math.inf])))}
    if kind == "mlp_rule":
        return {"mlp_rule": draw(st.text(max_size=12).filter(lambda r: r not in RULES))}
    if kind == "ignore_bos":
        return {"ignore_bos": draw(st.one_of(st.integers(-10**6, -1), st.integers(10**4, 10**9)))}
    name = draw(st.one_of(
        st.text(min_size=1, max_size=30),
        st.sampled_from(sorted(hooks)).map(lambda h: h + "x"),
        st.sampled_from(["blocks.0.attn.hook_pattern", "hook_tokens", "blocks.1.ln1.hook_scale"]),
    ).filter(lambda n: n not in hooks or n.endswith(("hook_pattern", "hook_tokens", "hook_scale"))))
    return {"keep": [name]}


@SETTINGS
@given(data=st.data(), how=entry)
def test_bad_options_are_refused(state, data, how):
    hooks = set(canonical_names(state.model)) | {"logits"}
    kw = data.draw(bad_options(hooks))
    if "keep" in kw or "ignore_bos" in kw:  # options of decompose only
        how = "decompose"
    assert_refused(state, lambda: CALLS[how](state.model, state.tokens, "tokens", kw),
                   f"{how} with {kw}")
