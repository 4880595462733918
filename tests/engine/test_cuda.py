"""The same code on a CUDA device (issue 15, item 5): results on the model's device and dtype, equal
to the CPU's to the float64 tolerance at every level and rule, chunked = unchunked, the backward
path, the memory check against the device's free memory. Skipped without a GPU."""

import pytest
import torch
from tiny import close, make_model, random_tokens

import tl_depass
from tl_depass import Heads, Neurons
from tl_depass.errors import DepassError

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

LEVELS = {"tokens": lambda: "tokens", "heads": Heads, "neurons": lambda: Neurons(1)}


def pair(**overrides):
    """The same random weights on the CPU and the GPU (TransformerLens would pick CUDA by itself)."""
    return make_model(device="cpu", **overrides), make_model(device="cuda", **overrides)


@pytest.mark.parametrize("rule", ["softmax", "ratio", "max"])
@pytest.mark.parametrize("level", list(LEVELS))
def test_decompose_on_cuda_equals_cpu(level, rule):
    cpu, gpu = pair()
    tokens = random_tokens(cpu, batch=2, pos=9)
    keep = ["blocks.1.mlp.hook_post", "blocks.1.hook_resid_post"]
    expected = tl_depass.decompose(cpu, tokens, LEVELS[level](), mlp_rule=rule, keep=keep,
                                   logits="all")
    got = tl_depass.decompose(gpu, tokens.cuda(), LEVELS[level](), mlp_rule=rule, keep=keep,
                              logits="all")
    assert got.labels == expected.labels
    for name in [*keep, "logits"]:
        assert got[name].device.type == "cuda" and got[name].dtype == torch.float64, name
        close(got[name].cpu(), expected[name], f"{level} {rule}: {name}")


@pytest.mark.parametrize("level", list(LEVELS))
def test_chunks_on_cuda_equal_one_forward(level):
    _, gpu = pair()
    tokens = random_tokens(gpu, batch=2, pos=9).cuda()
    whole = tl_depass.decompose(gpu, tokens, LEVELS[level](), chunk_size=10_000)
    chunked = tl_depass.decompose(gpu, tokens, LEVELS[level](), chunk_size=3)
    close(chunked.logits, whole.logits, f"{level}: chunk_size=3 vs one forward")


@pytest.mark.parametrize("level", ["tokens", "heads"])
def test_backward_path_on_cuda_equals_cpu(level):
    cpu, gpu = pair()
    tokens = random_tokens(cpu, batch=3)
    kwargs = dict(answer=3, wrong=[4, 5, 6], mlp_rule="ratio", method="backward")
    expected = tl_depass.attribute(cpu, tokens, LEVELS[level](), **kwargs)
    got = tl_depass.attribute(gpu, tokens.cuda(), LEVELS[level](), **kwargs)
    assert got.shares.device.type == "cuda"
    close(got.shares.cpu(), expected.shares, f"{level}: backward path")


def test_float32_model_stays_float32_and_complete():
    gpu = make_model(dtype=torch.float32, device="cuda")
    tokens = random_tokens(gpu, batch=2, pos=9).cuda()
    dec = tl_depass.decompose(gpu, tokens, Heads(), logits="all")
    assert dec.logits.dtype == torch.float32 and dec.logits.device.type == "cuda"
    for group in dec.groups:  # each layer's heads, rest and bias sum to the clean logits
        torch.testing.assert_close(dec.logits[group].sum(0), dec.clean_logits,
                                   rtol=tl_depass.completeness_rtol(torch.float32), atol=1e-4)


def test_memory_check_on_cuda_refuses_before_allocating():
    _, gpu = pair()
    tokens = random_tokens(gpu, batch=2, pos=9).cuda()
    estimate = tl_depass.estimate_memory(gpu, tokens, "tokens")
    assert estimate.total > 0
    with pytest.raises(DepassError, match="max_memory|chunk_size"):
        tl_depass.decompose(gpu, tokens, "tokens", max_memory=1)


def test_ratio_token_level_runs_one_forward_on_cuda(monkeypatch):
    """On a GPU the ratio rule keeps one forward (its CPU default is 2-8 windowed chunks)."""
    from tl_depass.engine import sweep

    _, gpu = pair(n_ctx=64)
    tokens = random_tokens(gpu, batch=1, pos=64).cuda()
    built = []
    original = sweep.FoldedForward
    monkeypatch.setattr(sweep, "FoldedForward", lambda *a, **k: built.append(1) or original(*a, **k))
    tl_depass.decompose(gpu, tokens, "tokens", mlp_rule="ratio")
    assert len(built) == 1
