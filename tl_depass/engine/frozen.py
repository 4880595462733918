"""The frozen model: the user's model with attention patterns, norm scales and MLP activation
ratios held at their clean values. Every map from a residual activation to the logits is then
affine, and DePass with `mlp_rule="ratio"` is exactly its linear part: the oracle for
`compare.zero_ablation` and the fast backward path of `attribute`."""

from collections.abc import Callable

from tl_depass.engine import hooks as names
from tl_depass.engine.backends import Model
from tl_depass.engine.clean_run import FROZEN as FROZEN_INPUTS  # what the decomposed pass replays
from tl_depass.engine.clean_run import CleanRun
from tl_depass.engine.guard import check_user_hooks, replaced_hooks
from tl_depass.engine.plan import mlp_site
from tl_depass.engine.replay import attend

__all__ = ["FROZEN_INPUTS", "frozen_hooks"]


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
