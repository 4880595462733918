"""The frozen model: the user's model with attention patterns, norm scales and MLP activation
ratios held at their clean values. Every map from a residual activation to the logits is then
affine, and DePass with `mlp_rule="ratio"` is exactly its linear part: the oracle for
`compare.frozen_ablation` and the fast backward path of `attribute`.

`frozen_hooks` freezes the model at a recorded clean run; `freeze_own` freezes it in the same
forward that computes the clean values (one forward instead of two, for the backward path)."""

from collections.abc import Callable

import einops
import torch
from torch import Tensor

from tl_depass.engine import hooks as names
from tl_depass.engine import rules
from tl_depass.engine.backends import Model, act_fn
from tl_depass.engine.clean_run import FROZEN as FROZEN_INPUTS  # what the decomposed pass replays
from tl_depass.engine.clean_run import CleanRun, unflatten_rows
from tl_depass.engine.guard import check_user_hooks, replaced_hooks
from tl_depass.engine.plan import mlp_site
from tl_depass.engine.slots import attend

__all__ = ["FROZEN_INPUTS", "freeze_own", "frozen_hooks"]


def frozen_hooks(model: Model, clean: CleanRun) -> list[tuple[str, Callable]]:
    """Hooks (for `model.hooks`) that turn `model` into its frozen model at `clean`, replayed the
    way the decomposed pass replays them: attention at hook_z (never at hook_pattern, which
    Bridge adapters that delegate attention to Hugging Face ignore)."""
    hooks = [(n, lambda x, hook, v=v: v.reshape(x.shape)) for n, v in clean.values.items()
             if n.endswith("hook_scale")]
    for layer in range(model.cfg.n_layers):
        state, attn = {}, names.block_hook(layer, "attn")
        pattern = clean[f"{attn}.hook_pattern"]
        hooks += [(f"{attn}.hook_v", lambda x, hook, s=state: s.update(v=x)),
                  (f"{attn}.hook_z", lambda x, hook, s=state, p=pattern: attend(p, s["v"][None]))]
    sites = [mlp_site(model, clean, layer)
             for layer in range(0 if model.cfg.attn_only else model.cfg.n_layers)]
    attn = [names.block_hook(layer, "attn") for layer in range(model.cfg.n_layers)]
    check_user_hooks(model, replaced_hooks(model, attn, sites))  # refused before any hook is added
    for site in sites:
        state = {}
        hooks += [(f"{site.prefix}.hook_pre", lambda x, hook, s=state: s.update(pre=x)),
                  (site.act_hook, lambda x, hook, s=state, f=site.facts:
                   (s["pre"].reshape(f.ratio.shape) * f.ratio + f.extra).reshape(x.shape))]
    return hooks


class Frozen(torch.autograd.Function):
    """Forward: the model's own `value`. Backward: the frozen map's gradient, `vjp(grad)` for
    `source` (what `value` was computed from), nothing through the model's own computation."""

    @staticmethod
    def forward(ctx, value: Tensor, source: Tensor, vjp: Callable[[Tensor], Tensor]) -> Tensor:
        ctx.vjp = vjp
        return value.clone()

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[None, Tensor, None]:
        return None, ctx.vjp(grad), None


def attend_vjp(state: dict[str, Tensor], grad: Tensor) -> Tensor:
    """The gradient `attend(pattern, v)` gives v (GQA: summed over each kv head's query heads).
    The pattern is read when the backward runs: some Bridge adapters fire hook_pattern only
    after hook_z."""
    v = state["v"]
    pattern = state["p"].to(v.device, v.dtype)  # [batch head_index query_pos key_pos]
    batch, heads, query = pattern.shape[:3]
    grad = grad.reshape(batch, query, heads, v.shape[-1])  # as hook_z: [batch pos head_index d_head]
    out = einops.einsum(pattern, grad, "b h q k, b q h d -> b k h d")
    return out.unflatten(2, (v.shape[2], -1)).sum(3).reshape(v.shape)


def freeze_own(model: Model, shape: tuple[int, int], known: dict[str, str],
               frozen: dict[str, Tensor]) -> list[tuple[str, Callable]]:
    """Hooks (for `model.hooks`, after any that record the clean values) that make one forward of
    `model` its own frozen model, with no clean run recorded first: each norm scale, attention
    pattern and MLP activation ratio act(pre)/pre is the value this forward computes, held there
    for the gradient. Every value the forward computes is the clean run's exactly (each hook
    returns its own value); the gradients are the frozen model's (`frozen_hooks`'): attention's
    at hook_z (from V, which hook_v stashes, and the pattern), the MLP's at its activation
    (`hook_mid` where it fires, as for SoLU, else `hook_post`). `shape`: the tokens' [batch, pos];
    `known`: `canonical_names(model)`; `frozen` receives each frozen hook_z and activation, by
    hook name (the tensors the model goes on with, so the gradients at them can be taken)."""
    hooks: list[tuple[str, Callable]] = [
        (n, lambda x, hook: x.detach()) for n in dict.fromkeys(known.values())
        if n.endswith("hook_scale")]
    attn = [names.block_hook(layer, "attn") for layer in range(model.cfg.n_layers)]
    for prefix in attn:
        state: dict[str, Tensor] = {}
        hooks += [(f"{prefix}.hook_pattern", lambda x, hook, s=state: s.update(p=x.detach())),
                  (f"{prefix}.hook_v", lambda x, hook, s=state: s.update(v=x)),
                  (f"{prefix}.hook_z", lambda x, hook, s=state, n=f"{prefix}.hook_z": keep(
                      frozen, n, Frozen.apply(x, s["v"], lambda g: attend_vjp(s, g))))]
    mlps = [] if model.cfg.attn_only else [names.block_hook(layer, "mlp")
                                           for layer in range(model.cfg.n_layers)]
    gated = [f"{m}.hook_post" for m in mlps] if model.cfg.gated_mlp else []
    check_user_hooks(model, [f"{a}.hook_z" for a in attn] + gated)  # as `replaced_hooks`
    for prefix in mlps:
        state = {}
        freeze = frozen_activation(act_fn(model, prefix), state, shape, bool(gated), frozen)
        hooks += [(f"{prefix}.hook_pre", lambda x, hook, s=state: s.update(pre=x))]
        hooks += [(f"{prefix}.hook_pre_linear", lambda x, hook, s=state: s.update(up=x.detach()))
                  ] if gated else []
        hooks += [(f"{prefix}.{n}", lambda x, hook, f=freeze, n=f"{prefix}.{n}": f(x, n))
                  for n in ("hook_mid", "hook_post") if f"{prefix}.{n}" in known]
    return hooks


def keep(frozen: dict[str, Tensor], name: str, x: Tensor) -> Tensor:
    frozen[name] = x
    return x


def frozen_activation(fn: Callable, state: dict, shape: tuple[int, int], gated: bool,
                      frozen: dict[str, Tensor]) -> Callable:
    """The MLP's activation: its own value, the gradient ratio * that of the output (at the first
    of hook_mid / hook_post to fire; SoLU's hook_post, after the MLP's norm, is left alone)."""
    def hook(x: Tensor, name: str) -> Tensor | None:
        if "done" in state:
            return None
        state["done"] = True
        pre, post = state["pre"], unflatten_rows(x.detach(), *shape)
        up = unflatten_rows(state["up"], *shape) if gated else None
        ratio = rules.neuron_facts(fn, unflatten_rows(pre.detach(), *shape), post, up).ratio
        return keep(frozen, name, Frozen.apply(
            x, pre, lambda g: (g.reshape(ratio.shape) * ratio).reshape(pre.shape)))
    return hook
