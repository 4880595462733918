"""The natural-text protocol on `pystdlib`: real code completions from its held-out files, and the
token and head protocols run on a few of them with sane shapes and values."""

import math

import pytest
import torch

from tl_depass import DepassError, Heads, models
from tl_depass.evaluate import completions
from tl_depass.evaluate import summary as report
from tl_depass.evaluate.run import Result, evaluate_tokens, evaluate_units
from tl_depass.models import corpus

N = 4


@pytest.fixture(scope="module")
def pystdlib():
    held = models.info("pystdlib")["corpus"]["held_out"]
    if not any((corpus.stdlib_root() / p).is_file() for p in held):
        pytest.skip("this interpreter's standard library has none of pystdlib's held-out files")
    return models.load("pystdlib")


@pytest.fixture(scope="module")
def batch(pystdlib):
    return completions.make(pystdlib, N, seed=0)


def test_completions_are_real_code_the_model_gets_right(pystdlib, batch):
    assert batch.tokens.shape == (N, completions.LENGTH) and batch.key_positions is None
    assert (batch.tokens[:, 0] == pystdlib.tokenizer.bos_token_id).all()
    assert (batch.tokens[:, 1:] != pystdlib.tokenizer.bos_token_id).all()  # one file per window
    with torch.no_grad():
        last = pystdlib(batch.tokens)[:, -1]
    rows = torch.arange(N)
    assert torch.equal(last.argmax(-1), batch.answers)  # the filter: top-1 ...
    torch.testing.assert_close(last[rows, batch.answers] - last[rows, batch.wrong], batch.margin)
    assert (batch.margin >= completions.MARGIN).all()  # ... with a margin over the runner-up
    assert (batch.wrong != batch.answers).all()
    assert torch.equal(batch.corrupted, batch.tokens.roll(-1, 0))
    assert N <= batch.scored and 0 < batch.files <= 31
    # each prompt and its answer are a piece of a held-out file, in the file's order
    held = "".join(corpus.read(p) for p in models.info("pystdlib")["corpus"]["held_out"]
                   if (corpus.stdlib_root() / p).is_file())
    for text, answer in zip(batch.texts, batch.answers.tolist(), strict=True):
        assert text + pystdlib.tokenizer.decode([answer]) in held
    again = completions.make(pystdlib, N, seed=0)
    assert torch.equal(again.tokens, batch.tokens) and torch.equal(again.wrong, batch.wrong)
    other = completions.make(pystdlib, N, seed=1)
    assert not torch.equal(other.tokens, batch.tokens)
    assert "not defined" in completions.describe(batch)


def test_no_window_passes_an_impossible_margin(pystdlib):
    held = models.info("pystdlib")["corpus"]["held_out"][:1]
    with pytest.raises(DepassError, match="lower margin"):
        completions.make(pystdlib, 2, margin=1e9, paths=held)
    with pytest.raises(DepassError, match="n >= 2"):
        completions.make(pystdlib, 1)


def test_protocols_run_on_real_text(pystdlib, batch):
    result = Result("pystdlib")
    evaluate_tokens(pystdlib, batch, result)
    tokens = result.tokens
    assert {"DePass (softmax)", "DePass (ratio)", "Integrated Gradients", "occlusion (leave one out)",
            "attention rollout", "random"} <= set(tokens.method)
    for column in ("disrupt_aopc", "recover_aopc"):
        assert tokens[column].between(0, 100).all()
    assert tokens.hit_rate.isna().all() and math.isnan(result.chance_hit_rate)  # not defined
    for curves in result.curves.values():
        assert curves["disrupt"].shape == curves["recover"].shape == (10,)
    result.heads, result.scores["heads"] = evaluate_units(pystdlib, batch, Heads())
    assert result.scores["heads"]["DePass (softmax)"].shape == (2, 4)
    assert result.scores["heads"]["exact patching (corrupted)"].isfinite().all()
    result.clean = {"accuracy": 1.0, "logit_diff": batch.margin.mean().item()}
    assert "not defined" in report.token_table(result)
    measures = report.headline([result]).measure.tolist()
    assert "tokens: Disrupt-top AOPC ↑" in measures and not any("hit rate" in m for m in measures)
