"""Completeness over the architecture matrix: at EVERY decomposable hook, the components sum to
the clean activation (float64 <= 1e-10, float32 <= 1e-5 relative), with every parameter random."""

import pytest
import torch
from matrix import MATRIX, PROCESSED
from tiny import make_model, random_tokens

import tl_depass
from tl_depass.engine.rules import RULES

ALL_HOOKS = lambda name: True  # noqa: E731


def assert_complete(dec: tl_depass.Decomposition, dtype: torch.dtype) -> None:
    tol = tl_depass.completeness_rtol(dtype)
    errors = dec.completeness_error()
    bad = {hook: err for hook, err in errors.items() if not err <= tol}
    assert not bad, f"completeness broken (tolerance {tol:.0e}) at {bad}"


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("arch", MATRIX)
def test_completeness_float64(arch, rule):
    model = make_model(**MATRIX[arch])
    dec = tl_depass.decompose(model, random_tokens(model), mlp_rule=rule, keep=ALL_HOOKS, logits="all")
    assert len(dec.completeness_error()) > 2 * model.cfg.n_layers
    assert_complete(dec, torch.float64)


@pytest.mark.parametrize("arch", MATRIX)
def test_completeness_float32(arch):
    model = make_model(dtype=torch.float32, **MATRIX[arch])
    dec = tl_depass.decompose(model, random_tokens(model), keep=ALL_HOOKS, logits="all")
    assert_complete(dec, torch.float32)


@pytest.mark.parametrize("rule", RULES)
def test_processed_weights(rule):
    model = make_model()
    model.process_weights_(**PROCESSED)
    assert model.cfg.normalization_type == "LNPre"
    dec = tl_depass.decompose(model, random_tokens(model), mlp_rule=rule, keep=ALL_HOOKS, logits="all")
    assert_complete(dec, torch.float64)


@pytest.mark.parametrize("arch", ["gpt2_ln", "llama_gqa", "gemma2", "parallel", "solu_ln"])
def test_causality(arch):
    """Token p's component is exactly zero at every position before p, at every hook."""
    model = make_model(**MATRIX[arch])
    tokens = random_tokens(model)
    dec = tl_depass.decompose(model, tokens, keep=ALL_HOOKS, logits="all")
    for hook, value in dec.results.items():
        for p in range(tokens.shape[1]):
            leak = value[p, :, :p]
            assert (leak == 0).all(), f"token {p} leaks into earlier positions at {hook}"
