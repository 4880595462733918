"""Every input form and call the README documents, on the default install's model class: a
bundled model loads as a HookedTransformer on TransformerLens 3.x and as a TransformerBridge on
4.x, so this file exercises the TL 4 paths in the leg that has only TL 4."""

import pandas as pd
import pytest
import torch

import tl_depass
from tl_depass import compare, completeness_rtol, models, tasks

F32 = completeness_rtol(torch.float32)


@pytest.fixture(scope="module")
def ioi():
    return models.load("ioi")


@pytest.fixture(scope="module")
def recall():
    return models.load("recall")


def complete(dec) -> None:
    for hook, err in dec.completeness_error().items():
        assert err <= F32, f"{hook}: completeness error {err:.1e}"


def test_token_inputs_every_documented_form(ioi):
    text = "When Mary and John went to the store , John gave a drink to"
    as_tensor = ioi.to_tokens(text)
    for form, tokens in {"str": text, "list": [text], "tensor": as_tensor, "1-d": as_tensor[0]}.items():
        dec = tl_depass.decompose(ioi, tokens, logits="all")
        complete(dec)
        torch.testing.assert_close(dec.logits.sum(0), ioi(as_tensor), msg=lambda m, f=form: f"{f}: {m}")
    assert dec.labels[-1] == "bias" and dec.labels[0].startswith("tok 0")


def test_a_list_of_prompts_is_padded_and_masked(ioi):
    """`decompose(model, ["prompt a", "prompt b"])`: prompts of different lengths get an attention
    mask, and each row equals that prompt alone."""
    short, long = "When Mary and John went to the store", "When Anna and Tom went to the park , Tom gave"
    dec = tl_depass.decompose(ioi, [short, long], logits="all")
    complete(dec)
    alone = tl_depass.decompose(ioi, short, logits="all")
    n = alone.logits.shape[2]
    torch.testing.assert_close(dec.logits[:n, 0, :n], alone.logits[:-1, 0])
    torch.testing.assert_close(dec.logits[-1, 0, :n], alone.logits[-1, 0])
    assert (dec.logits[:, 0, n:] == 0).all(), "padded positions have shares"


def test_readouts_with_string_answers(ioi):
    dec = tl_depass.decompose(ioi, "When Mary and John went to the store , John gave a drink to")
    score = dec.logit_attribution(" Mary", wrong=" John")
    clean = ioi(ioi.to_tokens("When Mary and John went to the store , John gave a drink to"))[0, -1]
    mary, john = ioi.to_single_token(" Mary"), ioi.to_single_token(" John")
    torch.testing.assert_close(score.sum(0)[0], clean[mary] - clean[john])
    # the default logits="last": [component, batch, d_vocab], summing to the last position's logits
    assert dec.logits.shape == (len(dec.labels), 1, ioi.cfg.d_vocab)
    torch.testing.assert_close(dec.logits.sum(0), clean[None])
    frame = dec.to_frame()
    assert isinstance(frame, pd.DataFrame) and {"component", "batch", "score"} <= set(frame.columns)


def test_every_level_and_circuit_readouts(recall):
    batch = tasks.generate("recall", 2, seed=0)
    tokens, answers, wrong = batch.tokens, batch.answers, batch.wrong
    basis = torch.randn(recall.cfg.d_model, 2, generator=torch.Generator().manual_seed(0))
    sae = (torch.randn(recall.cfg.d_model, 8), torch.zeros(8), torch.randn(8, recall.cfg.d_model),
           torch.zeros(recall.cfg.d_model))
    hook = "blocks.1.hook_resid_pre"
    levels = ["tokens", tl_depass.TokensAt(1), tl_depass.Heads(), tl_depass.Modules(), tl_depass.Neurons(0),
              tl_depass.Neurons(1, [3, 5]), tl_depass.Subspace(hook, basis),
              tl_depass.SAEFeatures(hook, sae, features=[0, 1])]
    for level in levels:
        for rule in ("softmax", "max", "ratio"):
            dec = tl_depass.decompose(recall, tokens, level, mlp_rule=rule)
            complete(dec)
    heads = tl_depass.decompose(recall, tokens, tl_depass.Heads(), mlp_rule="ratio")
    assert heads.head_scores(answers, wrong=wrong).shape == (2, recall.cfg.n_layers, recall.cfg.n_heads)
    assert heads.project("blocks.1.hook_resid_post", basis[:, 0], bias=0.5).shape[0] == len(heads.labels)
    assert len(heads.top_tokens("L1H3", k=3)) == 3
    by_token = tl_depass.decompose(recall, tokens, mlp_rule="ratio")
    own = tl_depass.decompose(recall, tokens, tl_depass.Split(hook, by_token[hook], by_token.labels),
                              mlp_rule="ratio")
    complete(own)


def test_attribute_both_methods_and_compare(recall):
    batch = tasks.generate("recall", 2, seed=1)
    for level in ("tokens", tl_depass.Heads(), tl_depass.Modules(), tl_depass.Neurons(1)):
        fwd, bwd = (tl_depass.attribute(recall, batch.tokens, level, answer=batch.answers, wrong=batch.wrong,
                                        mlp_rule="ratio", method=m) for m in ("forward", "backward"))
        torch.testing.assert_close(bwd.shares, fwd.shares, rtol=0, atol=1e-4 * fwd.shares.abs().max().item())
        assert bwd.shares.shape == (len(bwd.labels), 2) and bwd.mean().shape == (len(bwd.labels),)
    a, w = batch.answers[:1], batch.wrong[:1]

    def metric(logits):
        return (logits[:, -1, a] - logits[:, -1, w]).sum()

    for level in ("heads", "positions", "mlp"):
        result = compare.with_patching(recall, batch.tokens[:1], batch.corrupted[:1], metric, level=level)
        assert result is not None
    for ablation in (compare.frozen_ablation, compare.plain_ablation):
        assert ablation(recall, batch.tokens, metric).shape == (2, 4)
    for frozen in (True, False):  # the old flag, deprecated
        assert compare.zero_ablation(recall, batch.tokens, metric, frozen=frozen).shape == (2, 4)
