"""Semantics beyond sums: linearity, the intervention oracle, chunking, batching, padding."""

import pytest
import torch
from matrix import MATRIX
from tiny import close, make_model, random_tokens

import tl_depass
from tl_depass.engine.rules import RULES


def split_at(model, tokens, hook, parts):
    """A Split whose first components are `parts` and whose last is the clean rest."""
    _, cache = model.run_with_cache(tokens, names_filter=hook)
    rest = cache[hook] - parts.sum(0)
    return tl_depass.Split(hook, torch.cat([parts, rest[None]]))


@pytest.mark.parametrize("arch", ["gpt2_ln", "llama_gqa", "qwen3_qk_norm"])
def test_ratio_linearity(arch):
    """ratio is linear: decomposing a + b gives the shares of a plus the shares of b."""
    model = make_model(**MATRIX[arch])
    tokens = random_tokens(model)
    hook = "blocks.0.hook_resid_pre"
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn((2, *tokens.shape, model.cfg.d_model), generator=g, dtype=torch.float64)
    apart = tl_depass.decompose(model, tokens, split_at(model, tokens, hook, torch.stack([a, b])),
                                mlp_rule="ratio", keep=lambda n: True, logits="all")
    joint = tl_depass.decompose(model, tokens, split_at(model, tokens, hook, (a + b)[None]),
                                mlp_rule="ratio", keep=lambda n: True, logits="all")
    for name in joint.results:
        close(joint[name][0], apart[name][0] + apart[name][1], name)
        close(joint[name][-1], apart[name][-1], f"{name} (bias)")


def frozen_model_hooks(clean_cache, model):
    """Hooks that freeze the clean patterns, scales and MLP ratios of `model` (the frozen model)."""
    hooks = []
    for name, value in clean_cache.items():
        if name.endswith(("hook_scale", "hook_pattern")):
            hooks.append((name, lambda x, hook, v=value: v))
    for layer in range(model.cfg.n_layers):
        pre, post = clean_cache[f"blocks.{layer}.mlp.hook_pre"], clean_cache[f"blocks.{layer}.mlp.hook_post"]
        ratio = post / pre
        state = {}
        hooks.append((f"blocks.{layer}.mlp.hook_pre", lambda x, hook, s=state: s.update(pre=x)))
        hooks.append((f"blocks.{layer}.mlp.hook_post", lambda x, hook, s=state, r=ratio: s["pre"] * r))
    return hooks


@pytest.mark.parametrize("position", [0, 3, 7])
def test_intervention_oracle(position):
    """In the frozen model (ratio rule), removing one token's embedding changes every downstream
    activation by exactly that token's share."""
    model = make_model()
    tokens = random_tokens(model)
    dec = tl_depass.decompose(model, tokens, mlp_rule="ratio", keep=lambda n: True, logits="all")
    _, cache = model.run_with_cache(tokens)
    hooks = frozen_model_hooks(cache, model)
    removed = {}

    def remove(x, hook):
        x = x.clone()
        x[:, position] = 0
        return x

    def record(name):
        return lambda x, hook: removed.__setitem__(name, x.detach().clone())

    names = [n for n in dec.results if n != "logits"]
    logits = model.run_with_hooks(
        tokens, fwd_hooks=hooks + [("blocks.0.hook_resid_pre", remove)]
        + [(n, record(n)) for n in names])
    close(logits, cache["unembed.hook_out"] - dec.logits[position], "logits")
    for n in names:
        if n != "blocks.0.hook_resid_pre":
            close(removed[n], cache[n] - dec[n][position], n)


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("arch", ["gpt2_ln", "llama_gqa", "solu_ln", "qwen3_qk_norm"])
def test_chunking_is_exact(arch, rule):
    model = make_model(**MATRIX[arch])
    tokens = random_tokens(model, pos=9)
    whole = tl_depass.decompose(model, tokens, mlp_rule=rule, ignore_bos=int(tokens[0, 0]), logits="all")
    for size in (1, 2, 4):
        part = tl_depass.decompose(model, tokens, mlp_rule=rule, ignore_bos=int(tokens[0, 0]),
                                   chunk_size=size, logits="all")
        for name in whole.results:
            close(part[name], whole[name], f"{name}, chunk_size={size}")


@pytest.mark.parametrize("rule", RULES)
def test_batch_equals_one_at_a_time(rule):
    model = make_model(**MATRIX["llama_gqa"])
    tokens = random_tokens(model, batch=3)
    batched = tl_depass.decompose(model, tokens, mlp_rule=rule, logits="all")
    for b in range(3):
        single = tl_depass.decompose(model, tokens[b:b + 1], mlp_rule=rule, logits="all")
        for name in single.results:
            close(batched[name][:, b:b + 1], single[name], f"{name}, row {b}")


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("arch", ["gpt2_ln", "llama_gqa", "qwen3_qk_norm"])
def test_padding(arch, side):
    """Padded rows give the unpadded row's result; padded positions get zero shares."""
    model = make_model(**MATRIX[arch])
    long, short = random_tokens(model, batch=1, pos=8, seed=4), random_tokens(model, batch=1, pos=5)
    pad = torch.zeros(1, 3, dtype=torch.long)
    padded = torch.cat([pad, short], 1) if side == "left" else torch.cat([short, pad], 1)
    mask = torch.ones(2, 8, dtype=torch.long)
    if side == "left":
        mask[1, :3] = 0
    else:
        mask[1, 5:] = 0
    dec = tl_depass.decompose(model, torch.cat([long, padded]), attention_mask=mask, logits="all")
    alone = tl_depass.decompose(model, short, logits="all")
    real = slice(3, 8) if side == "left" else slice(0, 5)
    pads = [0, 1, 2] if side == "left" else [5, 6, 7]
    assert max(dec.completeness_error().values()) <= tl_depass.completeness_rtol(torch.float64)
    for name in alone.results:
        close(dec[name][real, 1, real], alone[name][:-1, 0], name)
        close(dec[name][-1, 1, real], alone[name][-1, 0], f"{name} (bias)")
        assert (dec[name][:, 1, pads] == 0).all(), f"padded positions have shares at {name}"
        assert (dec[name][pads, 1] == 0).all(), f"padding components have shares at {name}"
