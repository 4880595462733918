"""Structured labels: every level labels its components with kind, layer and index (the display
strings unchanged), to_frame shows them, and a level of one's own (one class) works."""

from dataclasses import dataclass

import pandas as pd
import pytest
import torch

import tl_depass
from tl_depass import DepassError, Heads, Modules, Neurons, SAEFeatures, Split, Subspace
from tl_depass.engine.backends import bridge_class, hooked_class
from tl_depass.levels import Group, Label, Level, MLPByPosition
from tl_depass.levels.base import stored

HOOK = "blocks.1.hook_resid_pre"


def hooked():
    if hooked_class() is None:
        pytest.skip("this transformer_lens has no HookedTransformer")
    from tiny import make_model, random_tokens

    model = make_model()
    return model, random_tokens(model, batch=2, pos=5)


def bridge():
    if bridge_class() is None:
        pytest.skip("this transformer_lens has no TransformerBridge")
    from bridges import make_bridge

    model, _ = make_bridge("GPT2LMHeadModel")
    return model, torch.randint(0, 61, (2, 5), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module", params=["hooked", "bridge"])
def setup(request):
    return {"hooked": hooked, "bridge": bridge}[request.param]()


def resid(model, tokens):
    return tl_depass.decompose(model, tokens, keep=[HOOK], logits=None).clean[HOOK]


def layer_group(layer: int, group: int, parts: list[tuple]) -> list[tuple]:
    return ([(f"L{layer} rest", "rest", layer, None, group)]
            + [(name, kind, layer, index, group) for name, kind, index in parts]
            + [(f"L{layer} bias", "bias", layer, None, group)])


def expected(level: str, model, tokens) -> list[tuple]:
    """(name, kind, layer, index, group) of every component, written out by hand."""
    cfg, pos = model.cfg, tokens.shape[1]
    bias = [("bias", "bias", None, None, 0)]
    if level == "tokens":
        return [(f"tok {p}", "token", 0, p, 0) for p in range(pos)] + bias
    if level == "tokens at 1":
        return [(f"L1 tok {p}", "token", 1, p, 0) for p in range(pos)] + bias
    if level == "heads":
        return [x for layer in range(cfg.n_layers) for x in layer_group(
            layer, layer, [(f"L{layer}H{h}", "head", h) for h in range(cfg.n_heads)])]
    if level == "modules":
        return layer_group(1, 0, [("L1 attn", "attn", None), ("L1 mlp", "mlp", None)])
    if level == "neurons":
        return layer_group(1, 0, [(f"L1N{i}", "neuron", i) for i in (0, 3, 5)])
    if level == "mlp by position":
        return [x for layer in range(cfg.n_layers) for x in layer_group(
            layer, layer, [(f"L{layer}P{p}", "mlp", p) for p in range(pos)])]
    if level == "split":
        return [("a", "part", None, 0, 0), ("b", "part", None, 1, 0)] + bias
    if level == "subspace":
        return [("x", "subspace", None, 0, 0), ("y", "subspace", None, 1, 0),
                ("rest", "rest", None, None, 0)] + bias
    assert level == "sae"
    return [("F0", "feature", None, 0, 0), ("F2", "feature", None, 2, 0),
            ("other features", "other features", None, None, 0), ("b_dec", "b_dec", None, None, 0),
            ("SAE error", "error", None, None, 0)] + bias


def spec(level: str, model, tokens):
    d, g = model.cfg.d_model, torch.Generator().manual_seed(3)
    if level == "tokens":
        return "tokens"
    if level == "tokens at 1":
        return tl_depass.TokensAt(1)
    if level == "heads":
        return Heads()
    if level == "modules":
        return Modules([1])
    if level == "neurons":
        return Neurons(1, [0, 3, 5])
    if level == "mlp by position":
        return MLPByPosition()
    if level == "split":
        x = resid(model, tokens)
        return Split(HOOK, torch.stack([0.25 * x, 0.75 * x]), ["a", "b"])
    if level == "subspace":
        return Subspace(HOOK, {"x": torch.randn(d, 2, generator=g, dtype=torch.float64),
                               "y": torch.randn(d, 1, generator=g, dtype=torch.float64)})
    shapes = [(d, 6), (6,), (6, d), (d,)]
    sae = tuple(torch.randn(*shape, generator=g, dtype=torch.float64) for shape in shapes)
    return SAEFeatures(HOOK, sae, features=[0, 2])


LEVELS = ["tokens", "tokens at 1", "heads", "modules", "neurons", "mlp by position", "split",
          "subspace", "sae"]


@pytest.mark.parametrize("level", LEVELS)
def test_every_level_has_structured_labels(setup, level):
    model, tokens = setup
    dec = tl_depass.decompose(model, tokens, spec(level, model, tokens), keep=[], mlp_rule="ratio")
    got = [(x.name, x.kind, x.layer, x.index, x.group) for x in dec.component_labels]
    assert got == expected(level, model, tokens), level
    assert dec.labels == [x.name for x in dec.component_labels], level
    assert all(isinstance(x, Label) and str(x) == x.name for x in dec.component_labels)


def test_separate_position_embedding_label():
    model, tokens = hooked()
    dec = tl_depass.decompose(model, tokens, pos_embed="separate", keep=[])
    assert [(x.name, x.kind, x.layer) for x in dec.component_labels[-2:]] == [
        ("pos", "pos", 0), ("bias", "bias", None)]


def test_to_frame_has_kind_layer_and_index(setup):
    model, tokens = setup
    dec = tl_depass.decompose(model, tokens, Heads([1]), keep=[])
    frame = dec.to_frame()
    assert list(frame.columns) == ["component", "kind", "layer", "index", "batch", "score"]
    head = frame[(frame.component == "L1H2") & (frame.batch == 0)].iloc[0]
    assert (head["kind"], head["layer"], head["index"]) == ("head", 1, 2)
    rest = frame[frame.component == "L1 rest"].iloc[0]
    assert rest.kind == "rest" and rest.layer == 1 and pd.isna(rest["index"])
    heads = frame[(frame.kind == "head") & (frame.batch == 1)]
    assert heads["index"].tolist() == list(range(model.cfg.n_heads))
    tokens_frame = tl_depass.decompose(model, tokens, keep=[]).to_frame()
    assert tokens_frame[tokens_frame.component == "bias"].layer.isna().all()


@dataclass(frozen=True, eq=False)
class Halves:
    """A level of one's own, in one class: the residual stream at `hook` split into its first and
    second halves of d_model."""

    hook: str = HOOK

    def check(self, model) -> "Halves":
        return self

    def reads(self, model) -> list[str]:
        return [self.hook]

    def groups(self, model, clean, tokens) -> list[Group]:
        x = clean[self.hook]
        low = torch.arange(x.shape[-1], device=x.device) < x.shape[-1] // 2
        labels = [Label("low", "half", index=0), Label("high", "half", index=1), Label("bias", "bias")]
        return [Group(labels, [stored(self.hook, torch.stack([x * low, x * ~low]))])]


def test_a_level_of_ones_own_works_with_decompose(setup):
    model, tokens = setup
    assert isinstance(Halves(), Level)
    dec = tl_depass.decompose(model, tokens, Halves(), mlp_rule="ratio")
    assert dec.labels == ["low", "high", "bias"]
    assert [(x.kind, x.index) for x in dec.component_labels] == [("half", 0), ("half", 1), ("bias", None)]
    tol = tl_depass.completeness_rtol(torch.float64)
    assert all(err <= tol for err in dec.completeness_error().values())
    x = resid(model, tokens)
    low = torch.arange(x.shape[-1]) < x.shape[-1] // 2
    same = tl_depass.decompose(model, tokens, Split(HOOK, torch.stack([x * low, x * ~low])),
                               mlp_rule="ratio")
    for name in same.results:
        torch.testing.assert_close(dec[name], same[name], rtol=0, atol=0,
                                   msg=lambda m, name=name: f"{name}: {m}")


def test_an_incomplete_level_is_refused_by_name(setup):
    model, tokens = setup

    class OnlyGroups:
        def groups(self, model, clean, tokens):
            return []

    with pytest.raises(DepassError, match="unknown components.*needs check, reads"):
        tl_depass.decompose(model, tokens, OnlyGroups())
