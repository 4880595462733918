"""Windows on the TransformerBridge: chunks of token components run from their first position
(component p is exactly zero before p), as on the HookedTransformer (tests/engine/test_windows.py),
for every Hugging Face family of tests/bridges.py, and a left-padded batch whose own forward is
not finite gets an error that says so."""

import pytest
import torch
from bridges import ARCHITECTURES, make_bridge

import tl_depass
from tl_depass.engine.backends import bridge_class

if bridge_class() is None:
    pytest.skip("this transformer_lens has no TransformerBridge", allow_module_level=True)

F64 = tl_depass.completeness_rtol(torch.float64)
TOKENS = torch.randint(0, 61, (2, 9), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_each_chunk_runs_from_its_first_position(arch, windows):
    bridge, _ = make_bridge(arch)
    mask = torch.ones_like(TOKENS)
    mask[1, 6:] = 0  # right padding: row 1's real tokens end before the last chunk's window
    for rule in ("softmax", "ratio"):
        options = dict(mlp_rule=rule, attention_mask=mask, logits="all")
        windows.clear()
        whole = tl_depass.decompose(bridge, TOKENS, **options)
        part = tl_depass.decompose(bridge, TOKENS, chunk_size=3, **options)
        assert windows == [0, 0, 3, 6], f"{arch} {rule}: windows {windows}"
        assert set(part.results) == set(whole.results)
        for name, value in whole.results.items():
            torch.testing.assert_close(part[name], value, rtol=0, atol=F64 * value.abs().max().item(),
                                       msg=lambda m, n=name, r=rule: f"{arch} {r} {n}: {m}")
        resid = part["blocks.1.hook_resid_post"]
        for p in range(9):  # component p is exactly zero before p, as the windows assume
            assert not resid[p, :, :p].any(), f"{arch}: token {p} reaches back"


def test_the_ratio_rule_chooses_windows_by_default(windows):
    bridge, _ = make_bridge("LlamaForCausalLM")
    tokens = torch.randint(0, 61, (1, 32), generator=torch.Generator().manual_seed(2))
    fast = tl_depass.decompose(bridge, tokens, mlp_rule="ratio")
    assert windows == [0, 16]
    one = tl_depass.decompose(bridge, tokens, mlp_rule="ratio", chunk_size=32)
    for name, value in one.results.items():
        torch.testing.assert_close(fast[name], value, rtol=0, atol=F64 * value.abs().max().item(),
                                   msg=lambda m, n=name: f"{n}: {m}")


def test_a_left_padded_batch_that_the_model_cannot_run_says_so():
    """Llama-like Bridges give NaN at a left-padded query (it may attend to nothing); the error
    names the padding and the fix, not the weights."""
    bridge, _ = make_bridge("LlamaForCausalLM")
    mask = torch.ones_like(TOKENS)
    mask[1, :3] = 0
    with torch.no_grad():
        assert not bridge(TOKENS, attention_mask=mask).isfinite().all()  # the model's own forward
    with pytest.raises(tl_depass.DepassError, match="left-padded.*padding_side = 'right'"):
        tl_depass.decompose(bridge, TOKENS, attention_mask=mask)
    mask = torch.ones_like(TOKENS)
    mask[1, 6:] = 0  # right padding runs
    tl_depass.decompose(bridge, TOKENS, attention_mask=mask)
