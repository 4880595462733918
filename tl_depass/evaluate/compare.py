"""DePass next to the activation patching researchers already trust.

The two measure different things. DePass splits the CLEAN run's output into each component's
contribution with attention patterns, norm scales and MLP activations frozen (no counterfactual
input). Activation patching (denoising, as in `transformer_lens.patching`) measures the CAUSAL
effect of restoring one clean activation inside the corrupted run, with everything downstream
free to react. They agree where a component's effect is direct and roughly linear; they differ
where later attention or MLP gates respond to the change (DePass holds those fixed) and where a
component matters equally in the clean and corrupted runs (patching sees no difference).
"""

import warnings
from dataclasses import dataclass
from typing import Literal

import einops
import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from tl_depass.arguments import prepare_tokens
from tl_depass.decompose import decompose
from tl_depass.decomposition import Decomposition
from tl_depass.engine.backends import Model, check_model, forward_as_recorded
from tl_depass.engine.clean_run import record_clean_run
from tl_depass.engine.frozen import FROZEN_INPUTS, frozen_hooks
from tl_depass.engine.guard import serialised
from tl_depass.engine.validate import check_options, public
from tl_depass.errors import DepassError
from tl_depass.evaluate import patch
from tl_depass.evaluate.metrics import Metric, correlation, metric_gradient
from tl_depass.levels import Heads, MLPByPosition, TokensAt

Level = Literal["heads", "positions", "mlp"]


@dataclass
class Comparison:
    """DePass next to activation patching at one level. `patching` is the restoration effect,
    metric(corrupted run with the clean activation restored) − metric(corrupted run): what
    restoring it brings back, 0 for a site that changes nothing (the convention of the report
    and the CLI). `patched` is the raw patched metric, as `transformer_lens.patching` returns
    it (`patching + corrupted_metric`)."""

    level: Level
    axes: tuple[str, str]  # ("layer", "head") or ("layer", "pos")
    depass: Float[Tensor, "layer index"]
    patching: Float[Tensor, "layer index"]  # restoration effect: patched − corrupted_metric
    pearson: float
    spearman: float
    frame: pd.DataFrame  # one row per (layer, index): depass, patching (effect) and patched (raw)
    patched: Float[Tensor, "layer index"]  # the raw patched metric (transformer_lens.patching's)
    corrupted_metric: float  # metric(corrupted run), nothing restored


def metric_scores(model: Model, dec: Decomposition, metric: Metric) -> Float[Tensor, " component"]:
    """Each component's share of `metric`: <d metric / d logits, component logits> at the clean
    logits (through any final softcap). Exact for metrics linear in the logits (a logit
    difference, say); the first-order share otherwise."""
    if dec.logit_positions is not None or "logits" not in dec.results:
        raise DepassError("metric_scores reads the logits at every position: decompose with "
                          "logits='all'")
    grad = metric_gradient(model, dec.clean["logits"], metric)
    return einops.einsum(dec.logits, grad, "c b p v, b p v -> c")


@serialised
def depass_scores(model: Model, tokens: Tensor, metric: Metric, level: Level, mlp_rule: str
                  ) -> Float[Tensor, "layer index"]:
    L, n = model.cfg.n_layers, tokens.shape[1]
    if level == "positions":
        rows = []
        for layer in range(L):
            dec = decompose(model, tokens, TokensAt(layer), mlp_rule=mlp_rule, keep=[], logits="all")
            rows.append(metric_scores(model, dec, metric)[:n])
        return torch.stack(rows)
    spec, width = (Heads(), model.cfg.n_heads) if level == "heads" else (MLPByPosition(), n)
    dec = decompose(model, tokens, spec, mlp_rule=mlp_rule, keep=[], logits="all")
    scores = metric_scores(model, dec, metric).reshape(L, width + 2)
    return scores[:, 1:-1]  # drop each layer's rest and bias


PATCHERS = {  # transformer_lens.patching function, result axes
    "heads": ("get_act_patch_attn_head_out_all_pos", ("layer", "head")),
    "positions": ("get_act_patch_resid_pre", ("layer", "pos")),
    "mlp": ("get_act_patch_mlp_out", ("layer", "pos")),
}


@public
@serialised
def with_patching(model: Model, clean_tokens, corrupted_tokens, metric: Metric, level: Level = "heads",
                  mlp_rule: str = "softmax") -> Comparison:
    """Run `transformer_lens.patching` at `level` (heads: attention head outputs, all positions;
    positions: resid_pre; mlp: MLP outputs by position) with `metric` (logits -> scalar), and
    the matching DePass scores (each component's share of `metric` in the clean run).
    `Comparison.patching` is the restoration effect (patched − corrupted metric, since 0.2.0;
    it was the raw patched metric before), `Comparison.patched` the raw patched metric."""
    if level not in PATCHERS:
        raise DepassError(f"unknown level {level!r}; use one of {list(PATCHERS)}")
    check_model(model)
    check_options(model, mlp_rule, 1.0, None)
    clean_tokens, _ = prepare_tokens(model, clean_tokens, None)
    corrupted_tokens, _ = prepare_tokens(model, corrupted_tokens, None)
    if clean_tokens.shape != corrupted_tokens.shape:
        raise DepassError(f"clean tokens {tuple(clean_tokens.shape)} and corrupted tokens "
                          f"{tuple(corrupted_tokens.shape)} differ in shape: patching needs the "
                          "same length")
    from transformer_lens import patching

    name, axes = PATCHERS[level]
    _, cache = model.run_with_cache(clean_tokens)
    patched = getattr(patching, name)(model, corrupted_tokens, cache, metric)
    with torch.no_grad():
        corrupted = metric(model(corrupted_tokens)).to(patched)
    effect = patched - corrupted
    ours = depass_scores(model, clean_tokens, metric, level, mlp_rule).to(patched)
    frame = pd.DataFrame([
        {axes[0]: i, axes[1]: j, "depass": ours[i, j].item(), "patching": effect[i, j].item(),
         "patched": patched[i, j].item()}
        for i in range(ours.shape[0]) for j in range(ours.shape[1])
    ])
    pearson, spearman = correlation(ours, effect)  # a shift by the corrupted metric changes neither
    return Comparison(level, axes, ours, effect, pearson, spearman, frame, patched, corrupted.item())


def head_ablation(model: Model, tokens: Int[Tensor, "batch pos"], metric: Metric, frozen: bool
                  ) -> Float[Tensor, "layer head_index"]:
    """metric(clean) − metric(one head's z zeroed at every position), for every head, in the
    frozen model (its hooks added to every forward) or in the model as it is. One forward per
    head, as transformer_lens.patching: a batched forward rounds differently (for folded heads,
    see baselines.activation_patching). `model` and `tokens` are checked by the caller."""
    clean = record_clean_run(model, tokens, None, lambda n: n.endswith(FROZEN_INPUTS))
    extra = frozen_hooks(model, clean) if frozen else []
    base = metric(clean.logits)
    units = [patch.head(layer, h) for layer in range(model.cfg.n_layers)
             for h in range(model.cfg.n_heads)]
    with forward_as_recorded(model):
        values = patch.patch_each(model, tokens, units, metric, 1, extra)
    return (base - values).reshape(model.cfg.n_layers, model.cfg.n_heads).to("cpu", base.dtype)


@public
@serialised
def plain_ablation(model: Model, tokens, metric: Metric) -> Float[Tensor, "layer head_index"]:
    """metric(clean) − metric(with one head's output zeroed), for every head: plain zero
    ablation, everything downstream free to react (the causal effect). `frozen_ablation` holds
    attention patterns, norm scales and MLP activation ratios at their clean values instead."""
    check_model(model)
    tokens, _ = prepare_tokens(model, tokens, None)
    return head_ablation(model, tokens, metric, False)


@public
@serialised
def zero_ablation(model: Model, tokens, metric: Metric, frozen: bool = True
                  ) -> Float[Tensor, "layer head_index"]:
    """Deprecated: `frozen_ablation` (frozen=True, the old default) or `plain_ablation`
    (frozen=False); the same numbers."""
    name = "frozen_ablation" if frozen else "plain_ablation"
    warnings.warn(f"compare.zero_ablation(..., frozen={frozen}) is deprecated: call "
                  f"compare.{name}(model, tokens, metric), which gives the same numbers",
                  DeprecationWarning, stacklevel=4)  # past `public` and `serialised`
    check_model(model)
    tokens, _ = prepare_tokens(model, tokens, None)
    return head_ablation(model, tokens, metric, frozen)


@public
@serialised
def frozen_ablation(model: Model, tokens, metric: Metric) -> Float[Tensor, "layer head_index"]:
    """metric(clean) − metric(with one head's output zeroed), for every head, in the frozen model:
    attention patterns, norm scales and MLP activation ratios held at their clean values, where
    DePass with mlp_rule="ratio" must agree exactly (the intervention oracle)."""
    check_model(model)
    tokens, _ = prepare_tokens(model, tokens, None)
    return head_ablation(model, tokens, metric, True)
