"""Groups entering at an MLP's output (Neurons, MLPByPosition) start after that block: block L runs
for the rest, probe and bias alone, the components' share of the MLP output is computed from their
rows (plan.mlp_output_entry, through.after_mlp). Equal to the full replay to the
float64 completeness tolerance, for every rule, kept hooks inside block L, padding and chunks."""

import pytest
import torch
from counting import mlp_entry_and_full

import tl_depass
from tl_depass.engine import plan
from tl_depass.levels.units import MLPByPosition, Neurons
from tl_depass.tolerances import completeness_rtol

tiny = pytest.importorskip("tiny")  # HookedTransformer only (TransformerLens 3.x)

ARCHS = {"gpt2": tiny.GPT2_LIKE, "llama": tiny.LLAMA_LIKE,  # and parallel blocks (GPT-J, GPT-NeoX)
         "gpt2_parallel": dict(tiny.GPT2_LIKE, parallel_attn_mlp=True),
         "llama_parallel": dict(tiny.LLAMA_LIKE, parallel_attn_mlp=True)}
INSIDE = ("hook_resid_pre", "hook_attn_out", "hook_resid_mid", "mlp.hook_pre", "mlp.hook_post",
          "hook_mlp_out", "hook_resid_post")


def inside(model, layers) -> list[str]:
    """The hooks of `INSIDE` in blocks `layers` (a parallel block has no resid_mid)."""
    return [f"blocks.{i}.{h}" for i in layers for h in INSIDE if f"blocks.{i}.{h}" in model.hook_dict]


def model_of(arch: str, **overrides):
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(**dict(ARCHS[arch], dtype=torch.float64, **overrides))
    return tiny.randomise(HookedTransformer(cfg), 0).eval()


def both(monkeypatch, model, tokens, components, **options):
    """(new path, full replay) of one call, checking that the new path was taken."""
    return mlp_entry_and_full(monkeypatch, model, tokens, components, **options)


def assert_same(quick, full):
    assert quick.results.keys() == full.results.keys()
    for name, value in full.results.items():
        tiny.close(quick.results[name], value, name)


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("rule", ["softmax", "ratio", "max"])
@pytest.mark.parametrize("layer", [0, 1])
def test_neurons_equal_the_full_replay(monkeypatch, arch, rule, layer):
    model = model_of(arch)
    tokens = tiny.random_tokens(model, 2, 6)
    keep = inside(model, range(layer, 2))
    assert_same(*both(monkeypatch, model, tokens, Neurons(layer), mlp_rule=rule, keep=keep,
                      logits="all"))


@pytest.mark.parametrize("arch", list(ARCHS))
def test_chosen_neurons_chunks_and_padding(monkeypatch, arch):
    model = model_of(arch, n_layers=3)
    tokens = tiny.random_tokens(model, 2, 7)
    mask = torch.ones_like(tokens)
    mask[0, :2] = 0  # left padding
    mask[1, -1] = 0  # right padding
    for components in (Neurons(1, [3, 0, 7, 11, 2]), MLPByPosition((1, 2))):
        quick, full = both(monkeypatch, model, tokens, components, mlp_rule="softmax", chunk_size=4,
                           attention_mask=mask, keep=lambda n: "resid" in n or "mlp_out" in n)
        assert_same(quick, full)
        whole = tl_depass.decompose(model, tokens, components, mlp_rule="softmax",
                                    attention_mask=mask,
                                    keep=lambda n: "resid" in n or "mlp_out" in n)
        assert_same(quick, whole)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_neuron_slots_are_exact(arch):
    """Before MLP L's output every neuron's share is exactly zero; at hook_mlp_out it is
    a_i W_out[i] (to rounding: the folded forward adds and subtracts b_out)."""
    model = model_of(arch)
    tokens = tiny.random_tokens(model, 2, 6)
    keep = inside(model, [1])
    dec = tl_depass.decompose(model, tokens, Neurons(1), keep=keep)
    for name in keep[:-3]:  # before the MLP's output
        assert torch.equal(dec[name][1:-1], torch.zeros_like(dec[name][1:-1])), name
    _, cache = model.run_with_cache(tokens)
    mlp = model.blocks[1].mlp
    act = cache["blocks.1.mlp.hook_post"]
    if model.cfg.gated_mlp:  # TL's gated MLP adds b_in after the product: that part is bias
        act = mlp.act_fn(cache["blocks.1.mlp.hook_pre"]) * cache["blocks.1.mlp.hook_pre_linear"]
    out = torch.einsum("bpn,nd->nbpd", act, mlp.W_out)
    tiny.close(dec["blocks.1.hook_mlp_out"][1:-1], out, "neuron outputs")
    one_hot = torch.diag_embed(act).permute(2, 0, 1, 3)  # [neuron, batch, pos, d_mlp]
    tiny.close(dec["blocks.1.mlp.hook_post"][1:-1], one_hot, "one-hot rows")
    tol = completeness_rtol(torch.float64)
    assert dec.completeness_error()["blocks.1.hook_resid_post"] <= tol
    # hook_post not kept: the rows are never built, each neuron's output is a_i W_out[i] itself
    quick = tl_depass.decompose(model, tokens, Neurons(1), keep=keep[-2:])
    if not model.cfg.gated_mlp:
        assert torch.equal(quick["blocks.1.hook_mlp_out"][1:-1], out)
    tiny.close(quick["blocks.1.hook_mlp_out"][1:-1], out, "neuron outputs, rows not built")
    for name in keep[-2:]:
        tiny.close(quick[name], dec[name], name)


def test_falls_back_where_it_does_not_apply():
    """A hook in block L, SoLU's layer-norm activation: the full replay (a parallel block, since
    the sixth session, not)."""
    from tl_depass.engine.clean_run import record_clean_run

    def entry(model):
        tokens = tiny.random_tokens(model, 1, 4)
        clean = record_clean_run(model, tokens, None, lambda n: True)
        return plan.mlp_output_entry(model, clean, Neurons(1).groups(model, clean, tokens))

    model = model_of("gpt2")
    assert entry(model) is not None
    with model.hooks(fwd_hooks=[("blocks.1.hook_mlp_out", lambda x, hook: x)]):
        assert entry(model) is None
    assert entry(model_of("gpt2", parallel_attn_mlp=True)) is not None
    assert entry(model_of("gpt2", act_fn="solu_ln")) is None
