"""compare.with_patching reports the restoration effect (patched − corrupted), as the CLI and the
report do; the raw patched metric stays available as `patched`."""

import pytest
import torch
from tiny import make_model, random_tokens
from transformer_lens import patching

from tl_depass.evaluate import compare
from tl_depass.evaluate.metrics import correlation, logit_diff

PATCHERS = {"heads": patching.get_act_patch_attn_head_out_all_pos,
            "positions": patching.get_act_patch_resid_pre, "mlp": patching.get_act_patch_mlp_out}


@pytest.mark.parametrize("level", list(PATCHERS))
def test_with_patching_is_the_restoration_effect(level):
    model = make_model()
    clean, corrupted = random_tokens(model), random_tokens(model, seed=9)
    metric = logit_diff(3, 4)
    result = compare.with_patching(model, clean, corrupted, metric, level=level)
    _, cache = model.run_with_cache(clean)
    raw = PATCHERS[level](model, corrupted, cache, metric)
    with torch.no_grad():
        base = metric(model(corrupted))
    torch.testing.assert_close(result.patched, raw)
    torch.testing.assert_close(result.patching, raw - base)
    assert result.corrupted_metric == pytest.approx(base.item())
    # every (layer, index) in the frame, with both conventions
    torch.testing.assert_close(torch.tensor(result.frame["patching"].values).reshape(raw.shape),
                               (raw - base).double().cpu())
    torch.testing.assert_close(torch.tensor(result.frame["patched"].values).reshape(raw.shape),
                               raw.double().cpu())
    # the correlations do not depend on the shift
    pearson, spearman = correlation(result.depass, raw)
    assert result.pearson == pytest.approx(pearson) and result.spearman == pytest.approx(spearman)
