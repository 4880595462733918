"""The one logit difference and the one correlation (Pearson; Spearman as the Pearson correlation
of ranks, no scipy): hand-computed examples and pandas as the independent implementation."""

import math

import pandas as pd
import pytest
import torch

from tl_depass import DepassError
from tl_depass.evaluate import metrics


def test_spearman_by_hand():
    """x = 1..5, y = 5 6 7 8 7: y's ranks are 1 2 3.5 5 3.5 (the tie shares 3 and 4), so
    Spearman = Σ dx·dy / √(Σdx² Σdy²) = 8 / √(10 · 9.5); Pearson = 6 / √(10 · 5.2)."""
    x = torch.tensor([1.0, 2, 3, 4, 5])
    y = torch.tensor([5.0, 6, 7, 8, 7])
    torch.testing.assert_close(metrics.ranks(y.double()),
                               torch.tensor([1, 2, 3.5, 5, 3.5], dtype=torch.float64))
    found = metrics.correlation(x, y)
    assert found.spearman == pytest.approx(8 / math.sqrt(95), abs=1e-12)
    assert found.pearson == pytest.approx(6 / math.sqrt(52), abs=1e-12)
    pearson, spearman = found  # a tuple too
    assert (pearson, spearman) == (found.pearson, found.spearman)


def test_agrees_with_pandas_with_ties_and_nan():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 6, (40,), generator=g).double()  # many ties
    y = x + torch.randn(40, generator=g, dtype=torch.float64)
    x[3], y[7] = float("nan"), float("nan")
    found = metrics.correlation(x.reshape(4, 10), y.reshape(4, 10))  # flattened
    # incomplete pairs are left out before ranking (scipy's nan_policy="omit")
    keep = ~(x.isnan() | y.isnan())
    a, b = pd.Series(x[keep].numpy()), pd.Series(y[keep].numpy())
    assert found.pearson == pytest.approx(a.corr(b), abs=1e-12)
    assert found.spearman == pytest.approx(a.rank().corr(b.rank()), abs=1e-12)


def test_degenerate_inputs():
    nan = metrics.correlation(torch.tensor([1.0, 2.0]), torch.tensor([2.0, 1.0]))
    assert math.isnan(nan.pearson) and math.isnan(nan.spearman)  # ±1 by construction: NaN
    flat = metrics.correlation(torch.ones(5), torch.arange(5.0))
    assert math.isnan(flat.pearson) and math.isnan(flat.spearman)  # no spread: undefined
    same = metrics.correlation(torch.arange(5.0), 3 * torch.arange(5.0) + 1)
    assert same == (1.0, 1.0)
    assert metrics.correlation(torch.arange(5.0), -torch.arange(5.0)) == (-1.0, -1.0)
    with pytest.raises(DepassError, match="one score per unit"):
        metrics.correlation(torch.arange(5.0), torch.arange(4.0))


def test_logit_diff():
    logits = torch.randn(3, 4, 10, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    answers, wrong = torch.tensor([1, 2, 3]), torch.tensor([4, 5, 6])
    want = torch.stack([logits[b, -1, answers[b]] - logits[b, -1, wrong[b]] for b in range(3)])
    torch.testing.assert_close(metrics.logit_diff_rows(logits, answers, wrong), want)
    torch.testing.assert_close(metrics.logit_diff(answers, wrong)(logits), want.mean())
    # one id for every prompt, and the answer's logit alone
    torch.testing.assert_close(metrics.logit_diff_rows(logits, 7, 2), logits[:, -1, 7] - logits[:, -1, 2])
    torch.testing.assert_close(metrics.logit_diff(7)(logits), logits[:, -1, 7].mean())
    top = logits[:, -1].argmax(-1)
    assert metrics.accuracy(logits, top) == 1.0
    assert metrics.accuracy(logits, (top + 1) % 10) == 0.0
