"""A committed probe of bad input across the public API: every case must raise DepassError with a
short message that contains a key word (no silent acceptance, no raw IndexError, no 200-line
type-checker dump).

    PYTHONPATH=$PWD python tests/engine/test_validate.py     # the table per family, no assertions

The table counts, per family, the cases tried and how many gave a clear error, were silently
accepted, or gave an unclear error (another exception, a long message or one without the key).
"""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))  # tests/tiny.py, tests/probe.py as a script

from probe import (  # noqa: E402
    HOOKED,
    A,
    Case,
    D,
    Env,
    R,
    eps0_nan,
    hook_count,
    metric,
    out_dir,
    outcome,
    run_cli,
    sae,
    split_with,
    symlink,
    table,
)

import tl_depass  # noqa: E402
from tl_depass import (  # noqa: E402
    DepassError,
    Heads,
    Modules,
    Neurons,
    SAEFeatures,
    Split,
    Subspace,
    TokensAt,
    compare,
    models,
)

F = "Split/hooks"
N = "non-finite"
W = "unknown words"
I = "indices"  # noqa: E741
T = "types"
C = "compare"
O = "CLI/out"  # noqa: E741
M = "misc"
nan = float("nan")

CASES = [
    # --- Split at the wrong hook, hook names, keep --------------------------------------------
    Case(F, "Split at hook_attn_out", lambda e: D(e, e.tokens, e.split("blocks.0.hook_attn_out")),
         "residual"),
    Case(F, "Split at hook_mlp_out", lambda e: D(e, e.tokens, e.split("blocks.1.hook_mlp_out")),
         "residual"),
    Case(F, "Split at mlp.hook_post", lambda e: D(e, e.tokens, e.split("blocks.0.mlp.hook_post")),
         "residual"),
    Case(F, "Split at hook_embed", lambda e: D(e, e.tokens, e.split("hook_embed")), "residual"),
    Case(F, "Split at ln1.hook_normalized",
         lambda e: D(e, e.tokens, e.split("blocks.0.ln1.hook_normalized")), "residual"),
    Case(F, "Split at ln_final.hook_normalized",
         lambda e: D(e, e.tokens, e.split("ln_final.hook_normalized")), "residual"),
    Case(F, "Split at attn.hook_z", lambda e: D(e, e.tokens, e.split("blocks.0.attn.hook_z")),
         "residual"),
    Case(F, "Split at hook_attn_out, attribute",
         lambda e: A(e, e.split("blocks.0.hook_attn_out")), "residual"),
    Case(F, "Subspace at hook_attn_out", lambda e: D(e, e.tokens, Subspace(
        "blocks.0.hook_attn_out", torch.randn(e.model.cfg.d_model, 2, dtype=torch.float64))),
        "residual"),
    Case(F, "SAEFeatures at hook_mlp_out", lambda e: D(e, e.tokens, SAEFeatures(
        "blocks.0.hook_mlp_out", sae(e, 5))), "residual"),
    Case(F, "Split at a misspelled hook", lambda e: D(e, e.tokens, Split(
        "blocks.0.hook_resid_pr", e.split("blocks.0.hook_resid_pre").tensor)), "did you mean"),
    Case(F, "Split at a layer past the model", lambda e: D(e, e.tokens, Split(
        "blocks.7.hook_resid_pre", e.split("blocks.0.hook_resid_pre").tensor)), "hook"),
    Case(F, "Split hook not a string", lambda e: D(e, e.tokens, Split(
        3, e.split("blocks.0.hook_resid_pre").tensor)), "hook"),
    Case(F, "Split tensor a list", lambda e: D(e, e.tokens, Split(
        "blocks.0.hook_resid_pre", e.split("blocks.0.hook_resid_pre").tensor.tolist())), "tensor"),
    Case(F, "Split tensor of integers", lambda e: D(e, e.tokens, Split(
        "blocks.0.hook_resid_pre", e.split("blocks.0.hook_resid_pre").tensor.long())),
        "floating"),
    Case(F, "Split tensor 3-d", lambda e: D(e, e.tokens, Split(
        "blocks.0.hook_resid_pre", e.split("blocks.0.hook_resid_pre").tensor[0])), "shape"),
    Case(F, "Split tensor d_model too small", lambda e: D(e, e.tokens, Split(
        "blocks.0.hook_resid_pre", e.split("blocks.0.hook_resid_pre").tensor[..., :-1])), "shape"),
    Case(F, "Split parts not summing", lambda e: D(e, e.tokens, Split(
        "blocks.0.hook_resid_pre", 2 * e.split("blocks.0.hook_resid_pre").tensor)), "sum"),
    Case(F, "Split with zero components", lambda e: D(e, e.tokens, Split(
        "blocks.0.hook_resid_pre", e.split("blocks.0.hook_resid_pre").tensor[:0])), "component"),
    Case(F, "Split with too few labels", lambda e: D(e, e.tokens, e.split(
        "blocks.0.hook_resid_pre", labels=("a",))), "labels"),
    Case(F, "Split labels not strings", lambda e: D(e, e.tokens, e.split(
        "blocks.0.hook_resid_pre", labels=(1, 2))), "label"),
    Case(F, "Split labels repeated", lambda e: D(e, e.tokens, e.split(
        "blocks.0.hook_resid_pre", labels=("a", "a"))), "label"),
    Case(F, "keep a misspelled hook", lambda e: D(e, keep=["blocks.0.hook_resid_prex"]),
         "did you mean"),
    Case(F, "keep hook_pattern", lambda e: D(e, keep=["blocks.0.attn.hook_pattern"]), "freezes"),
    Case(F, "keep a list holding an int", lambda e: D(e, keep=[3]), "keep"),
    Case(F, "keep an int", lambda e: D(e, keep=3), "keep"),
    Case(F, "keep a hook before the entry",
         lambda e: D(e, e.tokens, TokensAt(1), keep=["blocks.0.hook_resid_post"]), "before"),
    # --- NaN / inf -----------------------------------------------------------------------------
    Case(N, "Split tensor holding NaN", lambda e: D(e, e.tokens, split_with(e, nan)), "finite"),
    Case(N, "Split tensor holding inf", lambda e: D(e, e.tokens, split_with(e, float("inf"))),
         "finite"),
    Case(N, "Split tensor holding -inf", lambda e: D(e, e.tokens, split_with(e, -float("inf"))),
         "finite"),
    Case(N, "NaN in the token embedding", lambda e: tl_depass.decompose(
        e.broken("embed"), e.tokens), "hook_embed"),
    Case(N, "NaN in a layer 1 weight", lambda e: tl_depass.decompose(
        e.broken("blocks.1."), e.tokens), r"blocks\.1\."),
    Case(N, "NaN weights, Heads", lambda e: tl_depass.decompose(
        e.broken("blocks.0."), e.tokens, Heads()), r"blocks\.0\."),
    Case(N, "NaN weights, attribute backward", lambda e: tl_depass.attribute(
        e.broken("blocks.1."), e.tokens, Heads(), answer=3, mlp_rule="ratio"), "finite"),
    Case(N, "NaN weights, attribute forward", lambda e: tl_depass.attribute(
        e.broken("blocks.1."), e.tokens, "tokens", answer=3), "finite"),
    Case(N, "LayerNorm eps=0 on a constant stream", eps0_nan, "finite", hooked_only=True),
    Case(N, "NaN weights, plain_ablation", lambda e: compare.plain_ablation(
        e.broken("blocks.0."), e.tokens, metric), "finite"),
    Case(N, "temperature NaN", lambda e: D(e, temperature=nan), "temperature"),
    Case(N, "temperature inf", lambda e: D(e, temperature=float("inf")), "temperature"),
    Case(N, "Subspace basis with NaN", lambda e: D(e, e.tokens, Subspace(
        "blocks.1.hook_resid_pre", torch.full((e.model.cfg.d_model, 2), nan,
                                              dtype=torch.float64))), "finite"),
    Case(N, "SAE with NaN decoder", lambda e: D(e, e.tokens, SAEFeatures(
        "blocks.1.hook_resid_pre", sae(e, 5, bad=nan))), "finite"),
    Case(N, "project with a NaN direction", lambda e: e.dec.project(
        "blocks.1.hook_resid_pre", torch.full((e.model.cfg.d_model,), nan)), "finite"),
    # --- words the bundled tokenizer does not know -------------------------------------------
    Case(W, "decompose an unknown word", lambda e: tl_depass.decompose(
        e.bundled, e.prompt + " zzzz"), "zzzz"),
    Case(W, "decompose foo bar", lambda e: tl_depass.decompose(e.bundled, "foo bar"), "foo"),
    Case(W, "decompose a list with an unknown word", lambda e: tl_depass.decompose(
        e.bundled, [e.prompt, "s1 qqq"]), "qqq"),
    Case(W, "logit_attribution unknown answer", lambda e: e.bdec.logit_attribution("zzzz"),
         "zzzz"),
    Case(W, "logit_attribution unknown wrong", lambda e: e.bdec.logit_attribution(
        "s1", wrong="zzzz"), "zzzz"),
    Case(W, "logit_attribution list with an unknown word", lambda e: e.bdec.logit_attribution(
        ["zzzz"]), "zzzz"),
    Case(W, "logit_attribution two words", lambda e: e.bdec.logit_attribution("s1 s2"),
         "token"),
    Case(W, "logit_attribution empty string", lambda e: e.bdec.logit_attribution(""), "token"),
    Case(W, "head_scores unknown answer", lambda e: e.bdec.head_scores("zzzz"), "zzzz"),
    Case(W, "to_frame unknown answer", lambda e: e.bdec.to_frame("zzzz"), "zzzz"),
    Case(W, "attribute backward unknown answer", lambda e: tl_depass.attribute(
        e.bundled, e.prompt, Heads(), answer="zzzz", mlp_rule="ratio"), "zzzz"),
    Case(W, "attribute forward unknown wrong", lambda e: tl_depass.attribute(
        e.bundled, e.prompt, answer="s1", wrong="zzzz"), "zzzz"),
    Case(W, "attribute unknown word in the prompt", lambda e: tl_depass.attribute(
        e.bundled, e.prompt + " qq", Heads(), answer="s1", mlp_rule="ratio"), "qq"),
    Case(W, "empty prompt", lambda e: tl_depass.decompose(e.bundled, ""), "empty"),
    Case(W, "empty list of prompts", lambda e: tl_depass.decompose(e.bundled, []), "empty"),
    Case(W, "with_patching unknown word", lambda e: compare.with_patching(
        e.bundled, e.prompt + " zzzz", e.prompt + " s1", metric), "zzzz"),
    Case(W, "answer = the wrong answer", lambda e: e.bdec.logit_attribution("s1", wrong="s1"),
         "wrong"),
    # --- indices -------------------------------------------------------------------------------
    Case(I, "Neurons [-1], backward", lambda e: R(e, Neurons(0, [-1])), "neuron"),
    Case(I, "Neurons [-1], forward", lambda e: D(e, e.tokens, Neurons(0, [-1])), "neuron"),
    Case(I, "Neurons [1, 1], backward", lambda e: R(e, Neurons(0, [1, 1])), "duplicate"),
    Case(I, "Neurons [1, 1], forward", lambda e: D(e, e.tokens, Neurons(0, [1, 1])), "duplicate"),
    Case(I, "Neurons [], backward", lambda e: R(e, Neurons(0, [])), "empty"),
    Case(I, "Neurons [], forward", lambda e: D(e, e.tokens, Neurons(0, [])), "empty"),
    Case(I, "Neurons [10**9], backward", lambda e: R(e, Neurons(0, [10**9])), "d_mlp"),
    Case(I, "Neurons [10**9], forward", lambda e: D(e, e.tokens, Neurons(0, [10**9])), "d_mlp"),
    Case(I, "Neurons layer 5", lambda e: D(e, e.tokens, Neurons(5)), "layer"),
    Case(I, "Neurons layer -1, backward", lambda e: R(e, Neurons(-1)), "layer"),
    Case(I, "Neurons [1.5]", lambda e: D(e, e.tokens, Neurons(0, [1.5])), "neuron"),
    Case(I, "Neurons '12'", lambda e: R(e, Neurons(0, "12")), "neuron"),
    Case(I, "Neurons layer 0.0", lambda e: D(e, e.tokens, Neurons(0.0, [1])), "layer"),
    Case(I, "Heads [5]", lambda e: D(e, e.tokens, Heads([5])), "layer"),
    Case(I, "Heads [-1], backward", lambda e: R(e, Heads([-1])), "layer"),
    Case(I, "Heads [0, 0], forward", lambda e: D(e, e.tokens, Heads([0, 0])), "duplicate"),
    Case(I, "Heads [0, 0], backward", lambda e: R(e, Heads([0, 0])), "duplicate"),
    Case(I, "Heads []", lambda e: D(e, e.tokens, Heads([])), "layer"),
    Case(I, "Heads(0): an int, not a list", lambda e: D(e, e.tokens, Heads(0)), "layers"),
    Case(I, "Modules [3], backward", lambda e: R(e, Modules([3])), "layer"),
    Case(I, "Modules [1, 1]", lambda e: D(e, e.tokens, Modules([1, 1])), "duplicate"),
    Case(I, "Modules [0.5]", lambda e: D(e, e.tokens, Modules([0.5])), "layer"),
    Case(I, "TokensAt(-1)", lambda e: D(e, e.tokens, TokensAt(-1)), "layer"),
    Case(I, "TokensAt(n_layers)", lambda e: D(e, e.tokens, TokensAt(e.model.cfg.n_layers)),
         "layer"),
    Case(I, "TokensAt(5), backward", lambda e: R(e, TokensAt(5)), "layer"),
    Case(I, "TokensAt(1.0)", lambda e: D(e, e.tokens, TokensAt(1.0)), "layer"),
    Case(I, "SAEFeatures [-1]", lambda e: D(e, e.tokens, SAEFeatures(
        "blocks.1.hook_resid_pre", sae(e, 5), features=[-1])), "feature"),
    Case(I, "SAEFeatures [0, 0]", lambda e: D(e, e.tokens, SAEFeatures(
        "blocks.1.hook_resid_pre", sae(e, 5), features=[0, 0])), "duplicate"),
    Case(I, "SAEFeatures []", lambda e: D(e, e.tokens, SAEFeatures(
        "blocks.1.hook_resid_pre", sae(e, 5), features=[])), "empty"),
    Case(I, "Subspace basis of the wrong size", lambda e: D(e, e.tokens, Subspace(
        "blocks.1.hook_resid_pre", torch.randn(3, 2, dtype=torch.float64))), "basis"),
    Case(I, "Subspace with no bases", lambda e: D(e, e.tokens, Subspace(
        "blocks.1.hook_resid_pre", {})), "basis"),
    Case(I, "logit_attribution pos 99", lambda e: e.dec.logit_attribution(3, pos=99), "position"),
    Case(I, "logit_attribution pos 1.5", lambda e: e.dec.logit_attribution(3, pos=1.5),
         "position"),
    Case(I, "logit_attribution 3 positions for 2 rows", lambda e: e.dec.logit_attribution(
        3, pos=torch.tensor([1, 2, 3])), "position"),
    Case(I, "answer id -1", lambda e: e.dec.logit_attribution(-1), "vocabulary"),
    Case(I, "answer id 2.5", lambda e: e.dec.logit_attribution(2.5), "integer"),
    Case(I, "3 answers for 2 rows", lambda e: e.dec.logit_attribution([1, 2, 3]), "answers"),
    Case(I, "top_tokens component 999", lambda e: e.dec.top_tokens(999), "component"),
    Case(I, "top_tokens k=0", lambda e: e.dec.top_tokens(0, k=0), "k"),
    Case(I, "top_tokens k > d_vocab", lambda e: e.dec.top_tokens(0, k=10**6), "k"),
    Case(I, "top_tokens batch 5", lambda e: e.dec.top_tokens(0, batch=5), "batch"),
    Case(I, "top_tokens pos 99", lambda e: e.dec.top_tokens(0, pos=99), "position"),
    Case(I, "top_tokens unknown label", lambda e: e.dec.top_tokens("L9H9"), "no component"),
    Case(I, "head_scores on a token decomposition", lambda e: e.dec.head_scores(3),
         "no components match"),
    Case(I, "not-kept hook", lambda e: e.dec["blocks.0.hook_mlp_out"], "keep"),
    Case(I, "project at a not-kept hook", lambda e: e.dec.project(
        "blocks.0.hook_mlp_out", torch.ones(e.model.cfg.d_model)), "keep"),
    Case(I, "project with a direction of the wrong size", lambda e: e.dec.project(
        "blocks.1.hook_resid_pre", torch.ones(3)), "direction"),
    # --- types ---------------------------------------------------------------------------------
    Case(T, "tokens a list of ids", lambda e: D(e, [1, 2, 3]), "tokens"),
    Case(T, "tokens a nested list", lambda e: D(e, e.tokens.tolist()), "tokens"),
    Case(T, "tokens a numpy array", lambda e: D(e, e.tokens.numpy()), "tokens"),
    Case(T, "tokens an int", lambda e: D(e, 5), "tokens"),
    Case(T, "tokens None", lambda e: D(e, None), "tokens"),
    Case(T, "attribute tokens a list of ids", lambda e: A(e, tokens=[1, 2, 3]), "tokens"),
    Case(T, "attribute tokens None", lambda e: R(e, Heads(), tokens=None), "tokens"),
    Case(T, "temperature a string", lambda e: D(e, temperature="0.1"), "temperature"),
    Case(T, "chunk_size 1.5", lambda e: D(e, chunk_size=1.5), "chunk_size"),
    Case(T, "chunk_size a string", lambda e: D(e, chunk_size="2"), "chunk_size"),
    Case(T, "attention_mask a list", lambda e: D(e, attention_mask=[[1] * 6] * 2),
         "attention_mask"),
    Case(T, "ignore_bos a string", lambda e: D(e, ignore_bos="yes"), "ignore_bos"),
    Case(T, "pos_embed unknown", lambda e: D(e, pos_embed="sep"), "pos_embed"),
    Case(T, "mlp_rule an int", lambda e: D(e, mlp_rule=3), "mlp_rule"),
    Case(T, "mlp_rule in capitals", lambda e: D(e, mlp_rule="Softmax"), "mlp_rule"),
    Case(T, "components 'heads'", lambda e: D(e, e.tokens, "heads"), "components"),
    Case(T, "components a class, not an instance", lambda e: D(e, e.tokens, Heads), "components"),
    Case(T, "attribute answer None", lambda e: A(e, answer=None), "answer"),
    Case(T, "attribute method 'fast'", lambda e: A(e, method="fast"), "method"),
    Case(T, "attribute backward with softmax", lambda e: A(e, Heads(), method="backward"),
         "ratio"),
    Case(T, "attribute pos a list", lambda e: R(e, Heads(), pos=[1, 2]), "pos"),
    Case(T, "attribute temperature 0, backward", lambda e: R(e, Heads(), temperature=0.0),
         "temperature"),
    Case(T, "attribute chunk_size 0, backward", lambda e: R(e, Heads(), chunk_size=0),
         "chunk_size"),
    Case(T, "attribute pos_embed unknown", lambda e: R(e, Heads(), pos_embed="x"), "pos_embed"),
    Case(T, "attribute mlp_rule unknown", lambda e: A(e, Heads(), mlp_rule="taylor"), "mlp_rule"),
    Case(T, "attribute not a model", lambda e: tl_depass.attribute(
        torch.nn.Linear(2, 2), e.tokens, answer=1), "transformer_lens"),
    Case(T, "logit_attribution answer None", lambda e: e.dec.logit_attribution(None), "answer"),
    Case(T, "logit_attribution answer a float tensor", lambda e: e.dec.logit_attribution(
        torch.tensor([1.0, 2.0])), "integer"),
    # --- compare -------------------------------------------------------------------------------
    Case(C, "with_patching corrupted of another length", lambda e: compare.with_patching(
        e.model, e.tokens, e.tokens[:, :-1], metric), "length|shape"),
    Case(C, "with_patching level 'neurons'", lambda e: compare.with_patching(
        e.model, e.tokens, e.tokens.flip(1), metric, level="neurons"), "level"),
    Case(C, "with_patching float tokens", lambda e: compare.with_patching(
        e.model, e.tokens.float(), e.tokens.flip(1), metric), "integer"),
    Case(C, "with_patching tokens outside the vocabulary", lambda e: compare.with_patching(
        e.model, e.tokens + 1000, e.tokens.flip(1), metric), "vocabulary"),
    Case(C, "with_patching corrupted outside the vocabulary", lambda e: compare.with_patching(
        e.model, e.tokens, e.tokens + 1000, metric), "vocabulary"),
    Case(C, "with_patching mlp_rule unknown", lambda e: compare.with_patching(
        e.model, e.tokens, e.tokens.flip(1), metric, mlp_rule="taylor"), "mlp_rule"),
    Case(C, "with_patching metric not callable", lambda e: compare.with_patching(
        e.model, e.tokens, e.tokens.flip(1), 3), "metric"),
    Case(C, "with_patching not a model", lambda e: compare.with_patching(
        torch.nn.Linear(2, 2), e.tokens, e.tokens, metric), "transformer_lens"),
    Case(C, "plain_ablation float tokens", lambda e: compare.plain_ablation(
        e.model, e.tokens.float(), metric), "integer"),
    Case(C, "plain_ablation tokens outside the vocabulary", lambda e: compare.plain_ablation(
        e.model, e.tokens - 100, metric), "vocabulary"),
    Case(C, "plain_ablation not a model", lambda e: compare.plain_ablation(
        torch.nn.Linear(2, 2), e.tokens, metric), "transformer_lens"),
    Case(C, "plain_ablation metric not callable", lambda e: compare.plain_ablation(
        e.model, e.tokens, "logit"), "metric"),
    Case(C, "plain_ablation tokens a list", lambda e: compare.plain_ablation(
        e.model, [1, 2, 3], metric), "tokens"),
    Case(C, "plain_ablation too long", lambda e: compare.plain_ablation(
        e.model, torch.zeros(1, e.model.cfg.n_ctx + 1, dtype=torch.long), metric), "n_ctx"),
    # --- the command line ---------------------------------------------------------------------
    Case(O, "--out in a missing folder", lambda e: run_cli(
        e, "--out", os.path.join(out_dir(), "no", "such", "r.html")), "folder|director"),
    Case(O, "--out a directory", lambda e: run_cli(e, "--out", out_dir()), "director"),
    Case(O, "--out a symlink", lambda e: run_cli(e, "--out", symlink()), "symlink"),
    Case(O, "--wrong equal to --target", lambda e: run_cli(
        e, "--prompt", "t1 t2 t3 t1", "--target", "t2", "--wrong", "t2", "--no-report"),
        "--wrong"),
    Case(O, "--target unknown", lambda e: run_cli(e, "--target", "zebra", "--no-report"),
         "vocabulary", limit=400),  # lists the 50-word vocabulary of the model, on purpose
    Case(O, "--prompt with an unknown word", lambda e: run_cli(
        e, "--prompt", "t1 hello", "--no-report"), "vocabulary"),
    Case(O, "--layer 9", lambda e: run_cli(e, "--model", "recall", "--layer", "9",
                                           "--no-report"), "layer"),
    Case(O, "--top 0", lambda e: run_cli(e, "--top", "0", "--no-report"), "--top"),
    Case(O, "--model unknown", lambda e: run_cli(e, "--model", "nope", "--no-report"),
         "unknown model"),
    Case(O, "--rule unknown", lambda e: run_cli(e, "--rule", "taylor", "--no-report"), "rule"),
    Case(O, "--corrupted of another length", lambda e: run_cli(
        e, "--prompt", "t1 t2 t3", "--corrupted", "t1 t2", "--no-report"), "same length"),
    Case(O, "--prompt empty", lambda e: run_cli(e, "--prompt", " ", "--no-report"), "empty"),
    # --- shapes, masks, dtypes, loading ------------------------------------------------------
    Case(M, "tokens 3-d", lambda e: D(e, e.tokens[None]), "shape"),
    Case(M, "tokens with no positions", lambda e: D(e, e.tokens[:, :0]), "shape"),
    Case(M, "tokens with no rows", lambda e: D(e, e.tokens[:0]), "batch|shape"),
    Case(M, "tokens longer than n_ctx", lambda e: D(
        e, torch.zeros(1, e.model.cfg.n_ctx + 1, dtype=torch.long)), "n_ctx"),
    Case(M, "negative token ids", lambda e: D(e, e.tokens - 100), "vocabulary"),
    Case(M, "bool tokens", lambda e: D(e, e.tokens > 5), "integer"),
    Case(M, "float tokens", lambda e: D(e, e.tokens.float()), "integer"),
    Case(M, "attention_mask of another shape", lambda e: D(e, attention_mask=torch.ones(1, 3)),
         "attention_mask"),
    Case(M, "attention_mask holding 2", lambda e: D(e, attention_mask=2 * torch.ones_like(
        e.tokens)), "attention_mask"),
    Case(M, "attention_mask holding 0.5", lambda e: D(e, attention_mask=0.5 * torch.ones_like(
        e.tokens, dtype=torch.float)), "attention_mask"),
    Case(M, "attention_mask holding NaN", lambda e: D(e, attention_mask=torch.full(
        e.tokens.shape, nan)), "attention_mask"),
    Case(M, "attention_mask with an empty row", lambda e: D(e, attention_mask=torch.zeros_like(
        e.tokens)), "attention_mask"),
    Case(M, "ignore_bos a negative id", lambda e: D(e, ignore_bos=-1), "ignore_bos"),
    Case(M, "ignore_bos past the vocabulary", lambda e: D(e, ignore_bos=10**9), "ignore_bos"),
    Case(M, "chunk_size -3", lambda e: D(e, chunk_size=-3), "chunk_size"),
    Case(M, "temperature 0", lambda e: D(e, temperature=0.0), "temperature"),
    Case(M, "temperature -1", lambda e: D(e, temperature=-1.0), "temperature"),
    Case(M, "pos_embed separate with TokensAt(1)", lambda e: D(
        e, e.tokens, TokensAt(1), pos_embed="separate"), "pos_embed|separate"),
    Case(M, "models.load of an unknown name", lambda e: models.load("no-such-model"),
         "unknown model"),
    Case(M, "models.load of a missing path", lambda e: models.load("/nonexistent/m.json"),
         "missing"),
    Case(M, "to_frame of 3 answers for 2 rows", lambda e: e.dec.to_frame([1, 2, 3]), "answers"),
    Case(M, "attribute tokens 3-d", lambda e: A(e, tokens=e.tokens[None]), "tokens.*batch pos"),
    Case(M, "attribute attention_mask of another batch", lambda e: A(
        e, attention_mask=torch.ones(3, e.tokens.shape[1], dtype=torch.long)),
        "attention_mask.*batch=2"),
    Case(M, "attribute backward attention_mask 1-d", lambda e: R(
        e, Heads(), attention_mask=torch.ones(e.tokens.shape[1])), "attention_mask.*batch pos"),
    Case(M, "attribute pos of 3 rows for 2", lambda e: R(e, Heads(), pos=torch.tensor([1, 2, 3])),
         "pos.*batch=2"),
    Case(M, "attribute pos a float tensor", lambda e: A(e, pos=torch.tensor([1.0, 2.0])), "pos.*Integer"),
    Case(M, "estimate_memory tokens 3-d", lambda e: tl_depass.estimate_memory(
        e.model, e.tokens[None]), "tokens.*batch pos"),
    Case(M, "Attribution.mean weights of 3 rows for 2", lambda e: tl_depass.attribute(
        e.model, e.tokens, Heads(), answer=3, mlp_rule="ratio").mean(torch.ones(3)),
        r"weights.*\[batch=2\]"),
    Case(M, "Attribution.mean weights 2-d", lambda e: tl_depass.attribute(
        e.model, e.tokens, Heads(), answer=3, mlp_rule="ratio").mean(torch.ones(2, 1)),
        "weights.*batch"),
    Case(M, "decompose not a model", lambda e: tl_depass.decompose(
        torch.nn.Linear(2, 2), e.tokens), "transformer_lens"),
]


def selected() -> list[Case]:
    return [c for c in CASES if HOOKED or not c.hooked_only]


@pytest.fixture(scope="module")
def env():
    return Env()


@pytest.mark.parametrize("case", selected(), ids=[f"{c.family}: {c.what}" for c in selected()])
def test_bad_input_gets_a_clear_error(case, env):
    before = hook_count(env.model)
    kind, msg = outcome(case, env)
    assert kind == "clear", f"{case.what}: {kind}; key {case.key!r}; got {msg!r}"
    assert hook_count(env.model) == before, f"{case.what}: hooks left on the model"


def test_an_int_temperature_is_accepted(env):
    a = tl_depass.decompose(env.model, env.tokens, temperature=1)
    b = tl_depass.decompose(env.model, env.tokens, temperature=1.0)
    torch.testing.assert_close(a.logits, b.logits, rtol=0, atol=0)


def test_split_at_a_bridge_alias(env):
    """A Bridge's raw name of a residual hook is accepted (and means the same hook); its raw
    name of a non-residual hook is refused like the HookedTransformer name."""
    if HOOKED:
        pytest.skip("a HookedTransformer has no aliases: the TransformerLens 4.x leg runs this")
    from tl_depass.engine.backends import canonical_names

    hooks = canonical_names(env.model)
    alias = next(a for a, c in hooks.items() if c == "blocks.1.hook_resid_pre" and a != c)
    split = env.split(alias)
    by_alias = tl_depass.decompose(env.model, env.tokens, split)
    by_name = tl_depass.decompose(env.model, env.tokens, Split("blocks.1.hook_resid_pre",
                                                               split.tensor))
    torch.testing.assert_close(by_alias.logits, by_name.logits, rtol=0, atol=0)
    other = next(a for a, c in hooks.items() if c == "blocks.0.hook_attn_out" and a != c)
    with pytest.raises(DepassError, match="residual"):
        tl_depass.decompose(env.model, env.tokens, env.split(other))


if __name__ == "__main__":
    import warnings

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    print(table(selected()))
