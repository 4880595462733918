"""attribute()'s backward path runs a TransformerBridge once (no separate clean run; see
tests/test_attribute_one_pass.py for the HookedTransformer) and gives the forward path's shares."""

import pytest
import torch
from bridges import make_bridge
from counting import forwards

import tl_depass
from tl_depass import Heads, Modules, Neurons
from tl_depass.engine.backends import bridge_class
from tl_depass.tolerances import completeness_rtol

if bridge_class() is None:
    pytest.skip("this transformer_lens has no TransformerBridge", allow_module_level=True)


@pytest.mark.parametrize("arch", ["GPT2LMHeadModel", "LlamaForCausalLM", "OPTForCausalLM", "GPTJForCausalLM",
                                  "Qwen3ForCausalLM", "BloomForCausalLM", "OlmoForCausalLM"])
def test_bridge_one_forward(arch):
    bridge, _ = make_bridge(arch)
    tokens = torch.randint(0, 61, (2, 7), generator=torch.Generator().manual_seed(1))
    for components in ["tokens", Heads(), Modules(), Neurons(0)]:
        n, bwd = forwards(bridge, lambda c=components: tl_depass.attribute(
            bridge, tokens, c, answer=3, wrong=4, mlp_rule="ratio", method="backward"))
        assert n == 1, f"{arch} {components}: the backward path ran {n} forwards of the model"
        fwd = tl_depass.attribute(bridge, tokens, components, answer=3, wrong=4, mlp_rule="ratio",
                                  method="forward")
        atol = completeness_rtol(torch.float64) * fwd.shares.abs().max().item()  # the bias: 0 here
        for got, want, what in [(bwd.shares, fwd.shares, "shares"),
                                (bwd.remainder_shares, fwd.remainder_shares, "rest and bias")]:
            torch.testing.assert_close(got, want, rtol=0, atol=atol,
                                       msg=lambda m, c=components, w=what: f"{arch} {c} {w}: {m}")
