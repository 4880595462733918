"""ParamComponents: a weight matrix's output split into parameter subcomponents, propagated by
DePass. Checked with random rank-one decompositions built here (independent of SPD training)."""

import einops
import pytest
import torch
from matrix import MATRIX
from tiny import close, make_model, random_tokens

import tl_depass
from tl_depass import compare
from tl_depass.engine.clean_run import record_clean_run
from tl_depass.engine.frozen import FROZEN_INPUTS, frozen_hooks
from tl_depass.errors import DepassError


class RankOneSite:
    """W = Σ_c V[:, c] U[c] + delta, with random V, U: a decomposition of the weight the model
    uses (x @ W + b reproduces the output hook)."""

    def __init__(self, name, layer, input_hook, output_hook, W, b, C=6, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.name, self.layer, self.input_hook, self.output_hook, self.bias = (
            name, layer, input_hook, output_hook, b)
        self.V = torch.randn(W.shape[0], C, generator=g, dtype=W.dtype) / W.shape[0] ** 0.5
        self.U = torch.randn(C, W.shape[1], generator=g, dtype=W.dtype)
        self.delta = W - self.V @ self.U

    def flat(self, x):
        return x.flatten(-2) if self.name == "W_O" else x  # hook_z is [batch pos head d_head]

    def outputs(self, x):
        x = self.flat(x)
        per = einops.einsum(x, self.V, self.U, "... i, i c, c o -> c ... o")
        return torch.cat([per, (x @ self.delta)[None]])

    def causal_importance(self, x):
        return torch.sigmoid(3 * self.flat(x) @ self.V)


class Decomp:
    def __init__(self, sites):
        self.sites = sites


def sites_of(model, layer=1):
    block = model.blocks[layer]
    W_V = einops.rearrange(block.attn.W_V, "h m d -> m (h d)")
    W_O = einops.rearrange(block.attn.W_O, "h d m -> (h d) m")
    return {
        # LNPre: ln2's output is hook_normalized (no weight or bias to fold)
        "W_in": RankOneSite("W_in", layer, f"blocks.{layer}.ln2.hook_normalized",
                            f"blocks.{layer}.mlp.hook_pre", block.mlp.W_in, block.mlp.b_in),
        "W_out": RankOneSite("W_out", layer, f"blocks.{layer}.mlp.hook_post",
                             f"blocks.{layer}.hook_mlp_out", block.mlp.W_out, block.mlp.b_out, seed=1),
        "W_V": RankOneSite("W_V", layer, f"blocks.{layer}.ln1.hook_normalized",
                           f"blocks.{layer}.attn.hook_v", W_V, block.attn.b_V.flatten(), seed=2),
        "W_O": RankOneSite("W_O", layer, f"blocks.{layer}.attn.hook_z",
                           f"blocks.{layer}.hook_attn_out", W_O, block.attn.b_O, seed=3),
    }


@pytest.fixture(scope="module")
def setup():
    model = make_model(**MATRIX["ln_pre"])
    with torch.no_grad():
        sites = sites_of(model)
    return model, random_tokens(model), sites


@pytest.mark.parametrize("rule", ["softmax", "ratio"])
@pytest.mark.parametrize("site", ["W_in", "W_out", "W_V", "W_O"])
def test_completeness(setup, site, rule):
    model, tokens, sites = setup
    dec = tl_depass.decompose(model, tokens, tl_depass.ParamComponents(Decomp([sites[site]])),
                              mlp_rule=rule, keep=lambda n: True)
    assert dec.labels[0] == "L1 rest" and dec.labels[-3:] == [f"L1.{site} inactive", f"L1.{site} delta",
                                                              "L1 bias"]
    for hook, err in dec.completeness_error().items():
        assert err <= tl_depass.completeness_rtol(torch.float64), f"{site} {rule}: {hook} off by {err:.1e}"
    out = dec[sites[site].output_hook]  # at the matrix: the rows are the subcomponents' outputs
    x = record_clean_run(model, tokens, None, lambda n: n == sites[site].input_hook)[sites[site].input_hook]
    total = sites[site].outputs(x)
    close(out[1:-3].sum(0) + out[-3], total[:-1].sum(0).reshape(out.shape[1:]), f"{site} subcomponents")
    close(out[-2], total[-1].reshape(out.shape[1:]), f"{site} delta")


def logit_diff(logits):
    return (logits[:, -1, 3] - logits[:, -1, 4]).sum()


@pytest.mark.parametrize("site", ["W_in", "W_out", "W_V", "W_O"])
def test_linear_rule_equals_removing_the_subcomponent_in_the_frozen_model(setup, site):
    model, tokens, sites = setup
    s = sites[site]
    dec = tl_depass.decompose(model, tokens, tl_depass.ParamComponents(Decomp([s])), mlp_rule="ratio",
                              logits="all")
    shares = compare.metric_scores(model, dec, logit_diff)
    clean = record_clean_run(model, tokens, None, lambda n: n.endswith(FROZEN_INPUTS) or n == s.input_hook)
    x = clean[s.input_hook]
    outputs = s.outputs(x)
    active = (s.causal_importance(x) >= 0.1).movedim(-1, 0)
    base = logit_diff(clean.logits)
    checked = [c for c, label in enumerate(dec.component_labels) if label.kind == "param"]
    assert checked, "no active subcomponent to check"
    for c in checked:
        label, k = dec.labels[c], dec.component_labels[c].index
        assert label == f"L1.{site} c{k}" and dec.component_labels[c].layer == 1
        part = (outputs[k] * active[k][..., None]).reshape(clean.logits.shape[:2] + (-1,))

        def remove(y, hook, part=part):
            return y - part.reshape(y.shape)
        with torch.no_grad():
            logits = model.run_with_hooks(tokens, fwd_hooks=[(s.output_hook, remove)]
                                          + frozen_hooks(model, clean))
        close(shares[c], base - logit_diff(logits), f"{site} {label}")


def test_threshold_pools_into_inactive(setup):
    model, tokens, sites = setup
    every = tl_depass.decompose(model, tokens, tl_depass.ParamComponents(Decomp([sites["W_out"]]),
                                                                         threshold=0.0))
    none = tl_depass.decompose(model, tokens, tl_depass.ParamComponents(Decomp([sites["W_out"]]),
                                                                        threshold=2.0))
    assert every.labels == none.labels == (["L1 rest"] + [f"L1.W_out c{c}" for c in range(6)]
                                           + ["L1.W_out inactive", "L1.W_out delta", "L1 bias"])
    assert (every["logits"][-3] == 0).all() and (none["logits"][1:-3] == 0).all()
    close(none["logits"][-3], every["logits"][1:-3].sum(0), "inactive = all subcomponents")


def test_several_matrices_in_one_pass(setup):
    model, tokens, sites = setup
    dec = tl_depass.decompose(model, tokens, tl_depass.ParamComponents(Decomp(list(sites.values()))))
    assert len(dec.groups) == 4
    assert max(dec.completeness_error().values()) <= tl_depass.completeness_rtol(torch.float64)
    alone = tl_depass.decompose(model, tokens, tl_depass.ParamComponents(Decomp([sites["W_V"]])))
    close(dec.logits[dec.groups[2]], alone.logits, "W_V group alone vs with the others")


def test_errors(setup):
    model, tokens, sites = setup
    with pytest.raises(DepassError, match="no decomposed matrix"):
        tl_depass.decompose(model, tokens, tl_depass.ParamComponents(Decomp([sites["W_in"]]), layer=0))
    other = make_model(**MATRIX["ln_pre"], seed=5)
    with pytest.raises(DepassError, match="do not reproduce"):
        tl_depass.decompose(other, tokens, tl_depass.ParamComponents(Decomp([sites["W_out"]])))


def test_shipped_spd_of_recall():
    """The SPD of the bundled recall model (tl_depass/models/recall_spd) as DePass components."""
    from pathlib import Path

    from tl_depass import models, tasks
    from tl_depass.apd.lm.transformer import ParamDecomposition

    model = models.load("recall")
    spd = ParamDecomposition.load(Path(models.__file__).parent / "recall_spd")
    batch = tasks.generate("recall", 8, seed=7)
    dec = tl_depass.decompose(model, batch.tokens, tl_depass.ParamComponents(spd, layer=0),
                              mlp_rule="ratio")
    assert max(dec.completeness_error().values()) <= tl_depass.completeness_rtol(torch.float32)
    assert len(dec.groups) == len([s for s in spd if s.layer == 0])
