"""The evaluation protocols: deletion masks, k, the capped metric, that a method which knows the
important token beats random, ablation wiring, and one end-to-end run on a tiny model."""

from types import SimpleNamespace

import pytest
import torch
from tiny import random_tokens

from tl_depass import Heads, Neurons
from tl_depass.evaluate import baselines as B
from tl_depass.evaluate import components as C
from tl_depass.evaluate import evaluate, patch
from tl_depass.evaluate import summary as report
from tl_depass.evaluate import tokens as T


def test_k_formula():
    assert T.n_selected(10, 12) == 1  # int(0.1 * 10)
    assert T.n_selected(30, 12) == 3
    assert T.n_selected(10, 5) == 1  # int(0.3) = 0, at least one
    assert T.n_selected(29, 102) == 29  # int(0.29 * 100) would give 28
    assert T.n_selected(100, 9) == 7  # every processable token
    with pytest.raises(ValueError):
        T.n_selected(0, 10)


def test_deletion_mask_keeps_bos_and_last():
    scores = torch.randn(4, 9, generator=torch.Generator().manual_seed(0))
    scores[:, 0] = scores[:, -1] = 100.0  # even top-scored, BOS and last are never deleted
    for percent in T.PERCENTS:
        k = T.n_selected(percent, 9)
        disrupt = T.deletion_mask(scores, percent, "disrupt")
        recover = T.deletion_mask(scores, percent, "recover")
        for mask in (disrupt, recover):
            assert not mask[:, 0].any() and not mask[:, -1].any()
        assert (disrupt.sum(1) == k).all() and (recover.sum(1) == 7 - k).all()
        assert not (disrupt & recover).any()
        # the deleted (disrupt) tokens are the k best-scored processable ones
        inner = scores[:, 1:-1]
        kth = inner.topk(k, dim=1).values[:, -1:]
        assert torch.equal(disrupt[:, 1:-1], inner >= kth)


def test_delete_positions():
    tokens = torch.arange(12).reshape(2, 6)
    drop = torch.zeros(2, 6, dtype=torch.bool)
    drop[0, [1, 3]] = drop[1, [2, 4]] = True
    assert B.delete_positions(tokens, drop).tolist() == [[0, 2, 4, 5], [6, 7, 9, 11]]
    drop[1, 1] = True
    with pytest.raises(Exception, match="same number"):
        B.delete_positions(tokens, drop)


def test_metric_is_capped():
    clean = torch.tensor([0.1, 0.1, 0.4, 0.4])
    masked = torch.tensor([0.5, 0.05, 0.4, 0.0])
    torch.testing.assert_close(T.relative_change(clean, masked), torch.tensor([100.0, 50.0, 0.0, 100.0]))


class KeyTokenModel:
    """A stand-in model: the answer (token 1) is likely only while the key token 7 is present,
    and token 8 makes it a little likelier."""

    def __call__(self, tokens):
        logits = torch.zeros(*tokens.shape, 10, dtype=torch.float64)
        logits[:, -1, 1] = 4.0 * (tokens == 7).any(1) + 0.5 * (tokens == 8).any(1)
        return logits


def test_knowing_the_key_token_beats_random():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(2, 7, (32, 10), generator=g)
    tokens[:, 0] = 0
    where = torch.randint(1, 9, (32,), generator=g)
    tokens[torch.arange(32), where] = 7
    tokens[torch.arange(32), 1 + where % 8] = 8
    key = tokens == 7
    answers = torch.ones(32, dtype=torch.long)
    oracle = key.double() + 0.5 * (tokens == 8)
    random = B.random_scores((32, 10), seed=0)
    model = KeyTokenModel()
    curves = T.deletion_curves(model, tokens, answers, oracle)
    good = T.summarise(curves)
    bad = T.summarise(T.deletion_curves(model, tokens, answers, random))
    assert good["disrupt_aopc"] > bad["disrupt_aopc"] + 20
    assert good["recover_aopc"] < bad["recover_aopc"] - 20
    # from p = 30% (k = 2 of 8) the two tokens that matter are kept (nothing lost) or deleted
    p_clean = torch.tensor(4.5).exp() / (torch.tensor(4.5).exp() + 9)  # vs 1/10 without them
    assert curves["disrupt"].shape == (10, 32) and (curves["recover"][2:] == 0).all()
    torch.testing.assert_close(curves["disrupt"][2:], torch.full((8, 32), 100 * (1 - 0.1 / p_clean.item()),
                                                                 dtype=torch.float64))
    # every prompt behaves alike under the oracle ranking; random rankings differ per prompt
    assert good["disrupt_aopc_se"] == 0 and 0 < bad["disrupt_aopc_se"] < 10
    assert T.hit_rate(oracle, key) == 1.0
    assert T.chance_hit_rate(key) == pytest.approx(1 / 8)
    assert T.hit_rate(-oracle, key) == 0.0


def test_selection_top_and_bottom():
    scores = torch.tensor([[0.5, -2.0, 3.0], [1.0, float("nan"), 0.0]])
    assert C.selection(scores, 2, "top").tolist() == [[False, False, True], [True, False, False]]
    assert C.selection(scores, 2, "bottom").tolist() == [[False, True, False], [False, False, True]]
    assert C.n_units(0.3, 10) == 3 and C.n_units(0.02, 8) == 1


def test_ablation_wiring(model):
    """Top-k and bottom-k ablation zero exactly the selected heads/neurons, everything else free."""
    tokens = random_tokens(model, batch=3, pos=8, bos=0)
    answers, wrong = torch.tensor([3, 11, 17]), torch.tensor([5, 2, 9])
    scores = torch.tensor([[0.1, 0.9, -0.3, 0.2], [0.0, -1.0, 0.8, 0.3]], dtype=torch.float64)
    top = C.selection(scores, 2, "top")
    assert torch.nonzero(top).tolist() == [[0, 1], [1, 2]]

    def manual(pairs):
        def zero(z, hook, head):
            z = z.clone()
            z[:, :, head] = 0
            return z
        hooks = [(f"blocks.{layer}.attn.hook_z", lambda z, hook, h=h: zero(z, hook, h)) for layer, h in pairs]
        with torch.no_grad():
            return C.task_metrics(model.run_with_hooks(tokens, fwd_hooks=hooks), answers, wrong)

    assert C.ablated_metrics(model, tokens, answers, wrong, top, Heads()) == manual([(0, 1), (1, 2)])
    bottom = C.selection(scores, 2, "bottom")
    assert C.ablated_metrics(model, tokens, answers, wrong, bottom, Heads()) == manual([(0, 2), (1, 1)])
    with pytest.warns(DeprecationWarning, match="level object"):  # the old string form
        assert C.ablated_metrics(model, tokens, answers, wrong, top, "heads") == manual([(0, 1), (1, 2)])
    # neurons: the post-activation seen downstream has exactly the chosen neurons zeroed
    chosen = torch.zeros(24, dtype=torch.bool)
    chosen[[3, 10]] = True
    seen = {}
    _, cache = model.run_with_cache(tokens)
    with torch.no_grad(), patch.patched(model, [C.unit_patches(chosen, Neurons(1))]), model.hooks(
            fwd_hooks=[("blocks.1.mlp.hook_post", lambda a, hook: seen.update(a=a))]):
        model(tokens)  # the patch's hook runs first, then the one that looks
    assert (seen["a"][..., chosen] == 0).all()
    torch.testing.assert_close(seen["a"][..., ~chosen], cache["post", 1][..., ~chosen])
    with pytest.warns(DeprecationWarning, match="unit_patches"):
        assert len(C.ablation_hooks(chosen, "neurons", 1)) == 1


def test_correlations():
    ref = torch.tensor([3.0, -1.0, 2.0, 0.5])
    methods = {"same": ref * 2, "negated": -ref, "magnitude": ref.abs()}
    table = C.correlations(methods, ref).set_index("method")
    assert table.loc["same", "spearman"] == pytest.approx(1.0)
    assert table.loc["same", "pearson"] == pytest.approx(1.0)
    assert table.loc["negated", "spearman"] == pytest.approx(-1.0)
    assert table.loc["magnitude", "spearman_abs"] == pytest.approx(1.0)


def test_end_to_end_on_a_tiny_model(model, tmp_path):
    tokens = random_tokens(model, batch=6, pos=10, bos=0)
    key = torch.zeros_like(tokens, dtype=torch.bool)
    key[:, 4] = True
    batch = SimpleNamespace(tokens=tokens, answers=torch.tensor([1, 4, 7, 9, 12, 15]),
                            wrong=torch.tensor([2, 3, 5, 8, 11, 19]),
                            corrupted=random_tokens(model, batch=6, pos=10, seed=9, bos=0),
                            key_positions=key)
    result = evaluate(model, batch, "tiny", neuron_layers=[1])
    methods = set(result.tokens.method)
    assert {"DePass (softmax)", "DePass (ratio)", "Integrated Gradients", "occlusion (leave one out)",
            "attention rollout", "random"} <= methods
    assert not result.tokens.drop(columns="method").isna().any().any()
    ab = result.heads["ablation"]
    assert set(ab.method) >= {"DePass (softmax)", "|AtP| vs zero", "exact zero-ablation", "random"}
    # at k = 1 nothing can beat the exact single-unit ranking on the metric it ranks by
    for frames in (result.heads, result.neurons[1]):
        ab = frames["ablation"]
        one = ab[(ab.k == 1) & (ab.ablated == "top")].set_index("method").logit_diff
        assert one["exact zero-ablation"] <= one.min() + 1e-9
        corr = frames["correlation"]
        assert (corr.method == "exact zero-ablation").sum() == 1  # not correlated with itself
    text = report.markdown([result], "test conditions", {"tiny": "a tiny model"}, tmp_path / "figs", "figs")
    assert "| DePass (softmax) |" in text and "\\|AtP\\| vs zero" in text
    # only what the run computed: the prose about it is hand-written in docs/findings.md
    assert "(findings.md)" in text and "What wins" not in text and "## Caveats" not in text
    assert (tmp_path / "figs" / "tiny_tokens.png").exists()
    assert (tmp_path / "figs" / "tiny_ablation.png").exists()


def test_depass_in_prompt_chunks_equals_one_pass(model, monkeypatch):
    from tl_depass.evaluate import run

    tokens = random_tokens(model, batch=5, pos=8, bos=0)
    answers, wrong = torch.tensor([1, 4, 7, 9, 12]), torch.tensor([2, 3, 5, 8, 11])
    monkeypatch.setattr(run, "PROMPTS_PER_PASS", 2)
    heads = run.by_prompts(lambda t, a, w: B.depass_heads(model, t, a, w), tokens, answers, wrong, mean=True)
    torch.testing.assert_close(heads, B.depass_heads(model, tokens, answers, wrong))
    per_token = run.by_prompts(lambda t, a: B.depass_tokens(model, t, a, bos=0), tokens, answers, mean=False)
    torch.testing.assert_close(per_token, B.depass_tokens(model, tokens, answers, bos=0))


def test_headline_ranks_and_ties():
    import pandas as pd

    frame = pd.DataFrame({"method": ["DePass (softmax)", "DePass (ratio)", "occlusion", "gradient norm",
                                     "random", "exact zero-ablation"],
                          "score": [0.5, 0.9, 0.9, 0.2, 0.1, 5.0]})
    assert report.rank(frame, "DePass (ratio)", "score", higher=True) == "=1/5"  # exact methods left out
    assert report.rank(frame, "DePass (softmax)", "score", higher=True) == "3/5"
    assert report.rank(frame, "DePass (softmax)", "score", higher=False) == "3/5"
    assert report.best_baseline(frame, "score", higher=True) == "0.90 (occlusion)"
    frame.loc[3, "score"] = 0.9
    assert report.best_baseline(frame, "score", higher=True) == "0.90 (occlusion and 1 more, tied)"
