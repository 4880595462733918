"""The report's finer views (tl_depass.app.paths) against an independent plain-tensor computation
on tiny float64 models with every parameter randomised: each head's direct share of the metric by
source token, each source token's share read from the residual stream entering every layer, the
attention patterns and the vocabulary tables."""

import pytest
import torch
from einops import einsum
from tiny import GPT2_LIKE, LLAMA_LIKE, close, make_model, random_tokens

from tl_depass.app import paths
from tl_depass.app.explain import Prompt, explain
from tl_depass.app.html import render
from tl_depass.evaluate.metrics import logit_diff
from tl_depass.levels.label import Label

FAMILIES = {"gpt2": GPT2_LIKE, "llama": LLAMA_LIKE}
ANSWER, WRONG = 3, 4


def read_directly(model, cache, x):
    """[component, batch, pos, d_model] -> each component's direct share of logit(ANSWER) -
    logit(WRONG) at the last position: the final norm's linear part at its clean scale (its bias
    is no component's), then the unembedding."""
    x = x[:, 0, -1]
    if model.cfg.normalization_type == "LN":
        x = x - x.mean(-1, keepdim=True)
    x = x / cache["ln_final.hook_scale"][0, -1] * model.ln_final.w
    return x @ (model.W_U[:, ANSWER] - model.W_U[:, WRONG])


def head_outputs(model, cache, x, layer):
    """Each component's share of every head's output (z W_O, no b_O) at `layer`, from its share
    `x` of the residual stream entering it (the rules of docs/rules.md, in plain tensors)."""
    from reference import apply_norm

    block = model.blocks[layer]
    n = apply_norm(block.ln1, x, cache[f"blocks.{layer}.ln1.hook_scale"])
    v = einsum(n, block.attn.W_V, "c b p d, h d e -> c b p h e")
    v[-1] += block.attn.b_V
    z = einsum(cache[f"blocks.{layer}.attn.hook_pattern"], v, "b h q k, c b k h e -> c b q h e")
    return einsum(z, block.attn.W_O, "c b q h e, h e d -> c b q h d")


@pytest.mark.parametrize("family", list(FAMILIES))
def test_token_paths_match_a_plain_tensor_computation(family):
    from reference import reference_depass

    model = make_model(**FAMILIES[family])
    tokens = random_tokens(model, batch=1, pos=7)
    metric = logit_diff(ANSWER, WRONG)
    heads = [Label("L1H2", "head", 1, 2), Label("L0H1", "head", 0, 1), Label("L1H0", "head", 1, 0)]
    str_tokens = [f"[{int(t)}]" for t in tokens[0]]
    by_head, buildup = paths.token_paths(model, tokens, heads, "softmax", metric, str_tokens)
    assert by_head.columns == buildup.columns == [f"{p}: {t}" for p, t in enumerate(str_tokens)] + ["bias"]
    assert by_head.rows == ["L1H2", "L0H1", "L1H0", "other heads (and b_O)", "MLPs", "embeddings (direct)"]
    assert buildup.rows == ["resid entering L0 (embeddings)", "resid entering L1",
                            "final residual (after L1)"]

    ref = reference_depass(model, tokens, "softmax")  # component p = token p, then the bias
    _, cache = model.run_with_cache(tokens)
    for row, h in enumerate(heads):
        out = head_outputs(model, cache, ref[f"blocks.{h.layer}.hook_resid_pre"], h.layer)
        close(by_head.shares[row], read_directly(model, cache, out[:, :, :, h.index]), h.name)
        # the row sums to the head's direct share, read from the clean run alone
        clean = cache[f"blocks.{h.layer}.attn.hook_z"][:, :, h.index] @ model.W_O[h.layer, h.index]
        close(by_head.shares[row].sum(), read_directly(model, cache, clean[None])[0], f"{h.name} total")
    for row, layer in enumerate(range(model.cfg.n_layers)):
        close(buildup.shares[row], read_directly(model, cache, ref[f"blocks.{layer}.hook_resid_pre"]),
              f"resid_pre {layer}")
    # the final row: each token's whole share of the metric (the reference's logits, whose bias
    # component also holds the final norm's bias and b_U, which no vector carries)
    final = ref["logits"][:, 0, -1, ANSWER] - ref["logits"][:, 0, -1, WRONG]
    close(buildup.shares[-1, :-1], final[:-1], "final residual")
    # every row of the head table together is the final residual stream: columns sum to it
    close(by_head.shares.sum(0), buildup.shares[-1], "columns of the head table")
    # the first build-up row: only the last token is at the last position before layer 0
    assert (buildup.shares[0, :-2] == 0).all()


def test_patterns_and_vocabulary():
    model = make_model()
    tokens = random_tokens(model, batch=1, pos=6)
    heads = [Label("L1H3", "head", 1, 3), Label("L0H0", "head", 0, 0)]
    found = paths.patterns(model, tokens, heads)
    _, cache = model.run_with_cache(tokens)
    assert list(found) == ["L1H3", "L0H0"]
    torch.testing.assert_close(found["L1H3"], cache["blocks.1.attn.hook_pattern"][0, 3])
    torch.testing.assert_close(found["L0H0"], cache["blocks.0.attn.hook_pattern"][0, 0])

    logits = torch.tensor([1.0, 5.0, -2.0, 0.0, 3.0], dtype=torch.float64)  # mean 1.4
    up, down = paths.vocabulary(model, logits, k=2)
    assert [t for t, _ in up] == ["[1]", "[4]"] and [t for t, _ in down] == ["[2]", "[3]"]
    assert up[0][1] == pytest.approx(3.6) and down[0][1] == pytest.approx(-3.4)


def test_explain_has_the_new_views_and_renders_them():
    """explain() fills the head view, the two tables and the vocabulary of every level; the
    numbers agree with the levels' own (the build-up's final row with the token level, the
    patching convention with its raw value) and the page shows each view with its explanation."""
    model = make_model()
    tokens, corrupted = random_tokens(model, batch=1, pos=6), random_tokens(model, batch=1, pos=6, seed=5)
    ex = explain(model, Prompt(tokens, ANSWER, WRONG, corrupted), progress=False)
    heads = ex.levels["heads"]
    top = heads.depass.abs().argsort(descending=True)[:4].tolist()
    assert list(ex.patterns) == ex.head_tokens.rows[:4] == [heads.labels[i] for i in top]
    close(ex.buildup.shares[-1, :-1], ex.levels["tokens"].depass[:-1], "final row vs token level")
    assert ex.buildup.shares.shape == (model.cfg.n_layers + 1, tokens.shape[1] + 1)
    for name, level in ex.levels.items():
        assert len(level.vocab) == min(8, len(level.labels)), name
        assert level.corrupted_metric == pytest.approx(ex.corrupted_metric)
        torch.testing.assert_close(level.patched, level.patching + ex.corrupted_metric)
    with torch.no_grad():
        assert ex.corrupted_metric == pytest.approx(logit_diff(ANSWER, WRONG)(model(corrupted)).item())
    page = render(ex)
    for title in ("Build-up through the residual stream", "Attention patterns of the top heads",
                  "Head × source token", "Top tokens in the vocabulary"):
        assert f"<h2>{title}</h2>" in page, title
    assert "resid entering L<i>i</i></b> asks a different question" in page
    assert "Heads and Modules split attention differently" in page
    assert "sum of its heads (Heads)" in page and "the restoration effect" in page


def test_heads_sum_to_attn_plus_what_they_did_through_the_same_layers_mlp():
    """What the report says of Heads and Modules, with the ratio rule (linear): a layer's heads
    sum to its attn (Modules) plus the heads' share of the same layer's MLP output, carried on
    from the residual stream after that layer (a Split there)."""
    import tl_depass
    from tl_depass.engine.hooks import block_hook, resid_post
    from tl_depass.levels import Heads, Modules, Split

    model = make_model()
    tokens = random_tokens(model, batch=1, pos=6)
    for layer in range(model.cfg.n_layers):
        mlp_out = block_hook(layer, "hook_mlp_out")
        heads = tl_depass.decompose(model, tokens, Heads([layer]), mlp_rule="ratio", keep=[mlp_out])
        modules = tl_depass.decompose(model, tokens, Modules([layer]), mlp_rule="ratio")
        total = heads.logit_attribution(ANSWER, WRONG)[1:-1, 0].sum()  # [rest, heads..., bias]
        attn = modules.logit_attribution(ANSWER, WRONG)[modules.index(f"L{layer} attn"), 0]
        part = heads[mlp_out][1:-1].sum(0)  # the heads' share of the MLP's output
        clean = model.run_with_cache(tokens)[1][resid_post(layer)]
        on = tl_depass.decompose(model, tokens, Split(resid_post(layer), torch.stack([part, clean - part])),
                                 mlp_rule="ratio")
        through_mlp = on.logit_attribution(ANSWER, WRONG)[0, 0]
        assert (total - attn).abs() > 1e-3  # the difference is real on this model
        close(total, attn + through_mlp, f"layer {layer}")
