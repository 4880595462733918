"""decompose(logits=...): "last" (the default), "all", None, one position, or one per row. The kept
logits equal logits="all"'s at those positions, every other kept hook is unchanged, readouts at a
kept position agree, other positions refuse, and the unembedding runs only on kept positions."""

import pandas as pd
import pytest
import torch

import tl_depass
from tl_depass import DepassError
from tl_depass.engine.backends import bridge_class

FORMS = ["last", 3, -2, "tensor", None]
LEVELS = {"tokens": ("tokens", "softmax"), "heads": (tl_depass.Heads(), "ratio"),
          "neurons": (tl_depass.Neurons(1, [0, 3, 5]), "softmax")}


def same(actual, expected, what: str) -> None:
    atol = 1e-12 * expected.abs().max().clamp_min(1.0).item()
    torch.testing.assert_close(actual, expected, rtol=0, atol=atol, msg=lambda m: f"{what}: {m}")


def same_frame(actual, expected) -> None:
    """to_frame tables with the same rows and the same scores, to rounding (as `same`)."""
    pd.testing.assert_frame_equal(actual, expected, check_exact=False, rtol=0,
                                  atol=1e-12 * max(expected.score.abs().max(), 1.0))


def same_top(actual, expected) -> None:
    """top_tokens lists: the same tokens in the same order, the same values to rounding."""
    assert [t for t, _ in actual] == [t for t, _ in expected]
    torch.testing.assert_close(torch.tensor([v for _, v in actual]),
                               torch.tensor([v for _, v in expected]), rtol=0, atol=1e-12)


def ht_model():
    models = pytest.importorskip("tiny")  # skips on TransformerLens 4.x (no HookedTransformer)
    model = models.make_model()
    return model, models.random_tokens(model, batch=2, pos=6)


def bridge_model():
    if bridge_class() is None:
        pytest.skip("this transformer_lens has no TransformerBridge")
    from bridges import make_bridge

    tokens = torch.randint(0, 61, (2, 6), generator=torch.Generator().manual_seed(1))
    return make_bridge("GPT2LMHeadModel")[0], tokens


def padded(tokens, side: str):
    mask = torch.ones_like(tokens)
    if side == "right":
        mask[0, 4:] = 0  # row 0's last real token is 3
    elif side == "left":
        mask[1, :2] = 0
    else:
        return tokens, None
    return tokens.masked_fill(mask == 0, 0), mask


def form_value(form, batch: int):
    return torch.tensor([4, 2][:batch]) if form == "tensor" else form


def expected_positions(form, mask, n: int) -> torch.Tensor:
    if form == "last":
        return (torch.full((2,), n - 1) if mask is None
                else torch.tensor([max(i for i in range(n) if row[i]) for row in mask.tolist()]))
    if form == "tensor":
        return torch.tensor([4, 2])
    return torch.tensor([form % n] * 2)


def check_against_all(dec_all, dec, form, mask) -> None:
    """dec's logits are dec_all's at the kept positions; every other kept hook is unchanged."""
    n = dec_all.tokens.shape[1]
    assert set(dec.results) == set(dec_all.results) - ({"logits"} if form is None else set())
    for name in dec.results:
        if name != "logits":
            same(dec[name], dec_all[name], name)
            same(dec.clean[name], dec_all.clean[name], f"clean {name}")
    same(dec.clean_logits, dec_all.clean_logits, "clean_logits (always every position)")
    if form is None:
        assert dec.logit_positions is None and "logits" not in dec.clean
        with pytest.raises(DepassError, match="logits=None"):
            dec.logits  # noqa: B018
        return
    pos = expected_positions(form, mask, n)
    torch.testing.assert_close(dec.logit_positions, pos, rtol=0, atol=0)
    rows = torch.arange(2)
    assert dec.logits.shape == (len(dec.labels), 2, dec_all.logits.shape[-1])
    same(dec.logits, dec_all.logits[:, rows, pos], "logits")
    same(dec.clean["logits"], dec_all.clean["logits"][rows, pos], "clean logits")
    for g in dec.groups:  # each group (one per layer for Heads) sums to the clean logits
        same(dec.logits[g].sum(0), dec.clean["logits"], f"logits completeness, group {g}")
    assert max(dec.completeness_error().values()) < 1e-10


@pytest.mark.parametrize("side", ["none", "right", "left"])
@pytest.mark.parametrize("level", list(LEVELS))
def test_forms_equal_all(level, side):
    model, tokens = ht_model()
    tokens, mask = padded(tokens, side)
    components, rule = LEVELS[level]
    opts = dict(mlp_rule=rule, attention_mask=mask, keep=None)
    dec_all = tl_depass.decompose(model, tokens, components, **opts, logits="all")
    for form in FORMS:
        if side == "right" and form in (-2, "tensor"):
            continue  # a padded position: refused (test_bad_values)
        dec = tl_depass.decompose(model, tokens, components, logits=form_value(form, 2), **opts)
        check_against_all(dec_all, dec, form, mask)


@pytest.mark.parametrize("form", ["last", "tensor", None])
def test_bridge_forms_equal_all(form):
    model, tokens = bridge_model()
    tokens, mask = padded(tokens, "left" if form == "tensor" else "right")
    dec_all = tl_depass.decompose(model, tokens, attention_mask=mask, logits="all")
    dec = tl_depass.decompose(model, tokens, attention_mask=mask, logits=form_value(form, 2))
    check_against_all(dec_all, dec, form, mask)


def unembedded_shapes(model, tokens, **options) -> list[tuple[int, ...]]:
    """The shape of every unembedding output during decompose (clean run and folded forwards)."""
    shapes = []
    model.add_hook("unembed.hook_out", lambda x, hook: shapes.append(tuple(x.shape)))
    try:
        tl_depass.decompose(model, tokens, **options)
    finally:
        model.reset_hooks()
    return shapes


@pytest.mark.parametrize("backend", ["hooked", "bridge"])
def test_unembedding_only_kept_positions(backend):
    model, tokens = ht_model() if backend == "hooked" else bridge_model()
    batch, n = tokens.shape
    everything = unembedded_shapes(model, tokens, logits="all")
    folded = [s for s in everything if s[0] > batch]
    assert folded and all(s[1] == n for s in folded), everything  # logits="all": every position
    assert unembedded_shapes(model, tokens) == unembedded_shapes(model, tokens, logits="last")
    for form in ("last", 2, torch.tensor([0, 5])):
        shapes = unembedded_shapes(model, tokens, logits=form)
        clean, folded = shapes[0], shapes[1:]
        assert clean == (batch, n, clean[2])  # the clean run's own logits
        assert folded and all(s[0] % batch == 0 and s[0] > batch and s[1] == 1 for s in folded), (
            f"logits={form!r}: the unembedding saw {folded}, not one position per batch row")
    # logits=None: only the clean run unembeds a position; the folded forwards reach the
    # unembedding with none (it computes no logits)
    clean, *folded = unembedded_shapes(model, tokens, logits=None)
    assert clean == (batch, n, clean[2]) and all(s[1] == 0 for s in folded), folded


def test_readouts_equal_all():
    model, tokens = ht_model()
    tokens, mask = padded(tokens, "right")
    last = torch.tensor([3, 5])
    for components, scores in ((tl_depass.Heads(), "head_scores"),
                               (tl_depass.Neurons(1, [0, 3, 5]), "neuron_scores")):
        dec_all = tl_depass.decompose(model, tokens, components, attention_mask=mask, logits="all")
        dec = tl_depass.decompose(model, tokens, components, attention_mask=mask, logits="last")
        dec_pos = tl_depass.decompose(model, tokens, components, attention_mask=mask, logits=last)
        for d, pos in ((dec, -1), (dec, last), (dec_pos, last)):
            same(d.logit_attribution(3, 7, pos), dec_all.logit_attribution(3, 7, last),
                 "logit_attribution")
            same(d.logit_attribution([1, 2], None, pos),
                 dec_all.logit_attribution([1, 2], None, last), "logit_attribution")
            torch.testing.assert_close(getattr(d, scores)(3, 7, pos),
                                       getattr(dec_all, scores)(3, 7, last), equal_nan=True)
            same_frame(d.to_frame(pos=pos), dec_all.to_frame(pos=last))
        for c in (0, len(dec.labels) - 1, dec.labels[1]):
            same_top(dec.top_tokens(c, k=3, batch=1), dec_all.top_tokens(c, k=3, batch=1))
        same_top(dec_pos.top_tokens(0, k=3, batch=1, pos=5), dec_all.top_tokens(0, k=3, batch=1))


def test_show_at_kept_position():
    pytest.importorskip("plotly")
    model, tokens = ht_model()
    for components in ("tokens", tl_depass.Heads()):
        dec = tl_depass.decompose(model, tokens, components, logits="last")
        assert dec.show() is not None
        with pytest.raises(DepassError, match="logits='all'"):
            dec.show(pos=0)


def test_not_kept_position_refused():
    model, tokens = ht_model()
    dec = tl_depass.decompose(model, tokens, tl_depass.Heads(), logits=2)
    for call in (lambda: dec.logit_attribution(1, pos=-1), lambda: dec.head_scores(1, 2, pos=3),
                 lambda: dec.logit_attribution(1, pos=torch.tensor([2, 3])),
                 lambda: dec.top_tokens(0, pos=0), lambda: dec.to_frame(pos=-1)):
        with pytest.raises(DepassError, match="not kept.*logits='all' or logits=<pos>"):
            call()
    same(dec.logit_attribution(1, pos=2), dec.logit_attribution(1, pos=-4), "pos 2 == -4")
    none = tl_depass.decompose(model, tokens, logits=None)
    for call in (lambda: none.logit_attribution(1), lambda: none.top_tokens(0),
                 lambda: none.to_frame()):
        with pytest.raises(DepassError, match="logits=None"):
            call()


def test_bad_values():
    model, tokens = ht_model()
    tokens, mask = padded(tokens, "right")
    bad = {"first": "unknown logits", 6: "out of range", -7: "out of range",
           5: "padding in batch rows \\[0\\]", True: "logits must be",
           1.5: "logits must be", torch.tensor([1.0, 2.0]): "one integer position per batch row",
           torch.tensor([1, 2, 3]): "shape \\[2\\]", torch.tensor(1): "shape \\[2\\]",
           torch.tensor([True, False]): "one integer position",
           torch.tensor([4, 1]): "padding in batch rows \\[0\\]"}
    for value, message in bad.items():
        with pytest.raises(DepassError, match=message):
            tl_depass.decompose(model, tokens, attention_mask=mask, logits=value)
        with pytest.raises(DepassError, match=message):
            tl_depass.estimate_memory(model, tokens, attention_mask=mask, logits=value)


def test_attribute_forward_unchanged():
    model, tokens = ht_model()
    tokens, mask = padded(tokens, "right")
    last = torch.tensor([3, 5])
    for pos in (last, 2):
        got = tl_depass.attribute(model, tokens, tl_depass.Heads(), answer=3, wrong=7, pos=pos,
                                  attention_mask=mask, method="forward")
        dec = tl_depass.decompose(model, tokens, tl_depass.Heads(), attention_mask=mask, keep=[],
                                  logits="all")
        expected = dec.logit_attribution(3, 7, pos)
        named = [dec.labels.index(label) for label in got.labels]
        same(got.scores, expected[named].T, f"attribute forward at pos={pos}")


def test_estimate_shrinks():
    models = pytest.importorskip("tiny")
    model = models.make_model(n_ctx=512, d_vocab=50257, n_layers=1)  # GPT-2's vocabulary
    tokens = models.random_tokens(model, batch=1, pos=512)
    full = tl_depass.estimate_memory(model, tokens, keep=[], max_memory=2**50, logits="all")
    last = tl_depass.estimate_memory(model, tokens, keep=[], max_memory=2**50, logits="last")
    assert tl_depass.estimate_memory(model, tokens, keep=[], max_memory=2**50) == last  # default
    none = tl_depass.estimate_memory(model, tokens, keep=[], max_memory=2**50, logits=None)
    per_pos = full.components * 50257 * 8  # one position's logits, every component, float64
    assert full.results == 512 * per_pos
    assert last.results == per_pos and none.results == 0
    assert none.total < last.total < full.total / 10, (full, last)  # attention now dominates


def test_save_load(tmp_path):
    model, tokens = ht_model()
    tokens, mask = padded(tokens, "right")
    answer, last = torch.tensor([1, 2]), torch.tensor([3, 5])
    for i, form in enumerate(("last", last, None, "all")):
        dec = tl_depass.decompose(model, tokens, attention_mask=mask, logits=form)
        back = tl_depass.Decomposition.load(dec.save(tmp_path / str(i)))
        assert back.logits_kept == dec.logits_kept and set(back.results) == set(dec.results)
        if dec.logit_positions is None:
            assert back.logit_positions is None
        else:
            torch.testing.assert_close(back.logit_positions, dec.logit_positions, rtol=0, atol=0)
        for name in dec.results:
            torch.testing.assert_close(back[name], dec[name], rtol=0, atol=0, msg=name)
        if form is not None:
            torch.testing.assert_close(back.logit_attribution(answer, pos=last),
                                       dec.logit_attribution(answer, pos=last), rtol=0, atol=0)
    with pytest.raises(DepassError, match="not kept"):
        tl_depass.Decomposition.load(tmp_path / "0").logit_attribution(1, pos=2)


def test_bridge_readouts_and_attribute():
    model, tokens = bridge_model()
    tokens, mask = padded(tokens, "right")
    last = torch.tensor([3, 5])
    dec_all = tl_depass.decompose(model, tokens, tl_depass.Heads(), attention_mask=mask, keep=[],
                                  logits="all")
    dec = tl_depass.decompose(model, tokens, tl_depass.Heads(), attention_mask=mask, keep=[],
                              logits="last")
    same(dec.logit_attribution(3, 7), dec_all.logit_attribution(3, 7, last), "logit_attribution")
    torch.testing.assert_close(dec.head_scores(3, 7), dec_all.head_scores(3, 7, last),
                               equal_nan=True)
    with pytest.raises(DepassError, match="not kept"):
        dec.logit_attribution(3, 7, pos=torch.tensor([2, 2]))
    got = tl_depass.attribute(model, tokens, tl_depass.Heads(), answer=3, wrong=7, pos=last,
                              attention_mask=mask, method="forward")
    named = [dec_all.labels.index(label) for label in got.labels]
    same(got.scores, dec_all.logit_attribution(3, 7, last)[named].T, "attribute forward")


@pytest.mark.parametrize("form", ["last", None])
def test_chunked(form):
    """Chunked runs (statistics sweeps for the non-linear rules) keep the same logits."""
    model, tokens = ht_model()
    tokens, mask = padded(tokens, "left")
    dec_all = tl_depass.decompose(model, tokens, attention_mask=mask, logits="all")
    dec = tl_depass.decompose(model, tokens, attention_mask=mask, logits=form, chunk_size=2)
    check_against_all(dec_all, dec, form, mask)


@pytest.mark.parametrize("build", [ht_model, bridge_model], ids=["hooked", "bridge"])
def test_metric_scores_needs_every_position(build):
    from tl_depass import compare

    model, tokens = build()
    dec = tl_depass.decompose(model, tokens, logits="last")
    with pytest.raises(tl_depass.DepassError, match="logits='all'"):
        compare.metric_scores(model, dec, lambda logits: logits[:, -1, 3].sum())


@pytest.mark.parametrize("side", ["none", "right", "left"])
def test_default_keeps_each_rows_last_token(side):
    """The default (0.2.0) is logits="last": [component, batch, d_vocab] at each row's last real
    token. Every logit readout works with it at pos=-1 (or the kept positions) and refuses any
    other position with a DepassError that names logits='all'."""
    model, tokens = ht_model()
    tokens, mask = padded(tokens, side)
    n, rows = tokens.shape[1], torch.arange(2)
    last = expected_positions("last", mask, n)
    for components, scores in (("tokens", None), (tl_depass.Heads(), "head_scores"),
                               (tl_depass.Neurons(1, [0, 3, 5]), "neuron_scores")):
        dec = tl_depass.decompose(model, tokens, components, attention_mask=mask)
        dec_all = tl_depass.decompose(model, tokens, components, attention_mask=mask, logits="all")
        assert dec.logits_kept == "last" and dec.logits.shape == (len(dec.labels), 2, model.cfg.d_vocab)
        torch.testing.assert_close(dec.logit_positions, last, rtol=0, atol=0)
        same(dec.logits, dec_all.logits[:, rows, last], "default logits")
        for pos in (-1, last):
            same(dec.logit_attribution(3, 7, pos), dec_all.logit_attribution(3, 7, last),
                 f"logit_attribution pos={pos}")
            same_frame(dec.to_frame(pos=pos), dec_all.to_frame(pos=last))
            if scores is not None:
                torch.testing.assert_close(getattr(dec, scores)(3, 7, pos),
                                           getattr(dec_all, scores)(3, 7, last), equal_nan=True)
        top = dec_all.top_tokens(1, k=3, batch=1, pos=int(last[1]))
        same_top(dec.top_tokens(1, k=3, batch=1), top)
        # positions 2 and 3 are real in every row of every padding
        refused = [lambda d: d.logit_attribution(3, pos=2), lambda d: d.logit_attribution(3, pos=-3),
                   lambda d: d.logit_attribution(3, 7, pos=torch.tensor([3, 2])),
                   lambda d: d.top_tokens(0, batch=0, pos=1), lambda d: d.to_frame(pos=2),
                   lambda d: d.to_frame(3, 7, pos=2)]
        if scores is not None:
            refused.append(lambda d, s=scores: getattr(d, s)(3, 7, pos=2))
        for call in refused:
            with pytest.raises(DepassError, match="not kept.*logits='all'"):
                call(dec)
