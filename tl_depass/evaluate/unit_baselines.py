"""Component-level baselines: one score per head (`Heads()`: `[layer head_index]`) or per neuron
of one layer (`Neurons(layer)`: `[d_mlp]`) for a scalar `metric`; re-exported by
`tl_depass.evaluate.baselines`. The old `"heads"` / `("neurons", layer)` strings still work, with
a DeprecationWarning."""

import einops
import torch
from jaxtyping import Float, Int
from torch import Tensor

from tl_depass.engine.backends import Model
from tl_depass.errors import DepassError
from tl_depass.evaluate import patch
from tl_depass.evaluate.metrics import Metric
from tl_depass.evaluate.unit_levels import UnitLevel, as_level, unit_hooks
from tl_depass.levels import Heads, Neurons

HEADS = Heads()  # the default level: every head of every layer

def unit_sum(x: Tensor, hook_name: str) -> Tensor:
    """Sum over batch, position (and d_head): one value per head or neuron."""
    if hook_name.endswith("hook_z"):
        return einops.reduce(x, "batch pos head d_head -> head", "sum")
    return einops.reduce(x, "batch pos d_mlp -> d_mlp", "sum")


def activations_and_gradients(model: Model, tokens: Int[Tensor, "batch pos"], metric: Metric,
                              names: list[str]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Clean activations at `names` and the gradient of `metric` with respect to each (a zero
    tensor is added at each hook, so gradients flow through every later site: total derivatives)."""
    acts, deltas = {}, {}

    def add_delta(x: Tensor, hook, name: str) -> Tensor:
        # keyed by the name we registered: on a TransformerBridge `hook.name` can be an alias
        acts[name] = x.detach()
        deltas[name] = torch.zeros_like(x, requires_grad=True)
        return x + deltas[name]

    with torch.enable_grad():
        logits = model.run_with_hooks(
            tokens, fwd_hooks=[(n, lambda x, hook, n=n: add_delta(x, hook, n)) for n in names])
        grads = torch.autograd.grad(metric(logits), [deltas[n] for n in names])
    return {n: acts[n] for n in names}, dict(zip(names, grads, strict=True))


def check_corrupted(tokens: Tensor, corrupted: Tensor | None) -> None:
    if corrupted is not None and corrupted.shape != tokens.shape:
        raise DepassError(f"corrupted tokens are {tuple(corrupted.shape)} but tokens are "
                          f"{tuple(tokens.shape)}: pass one corrupted prompt of the same length per prompt")


def cached(model: Model, tokens: Int[Tensor, "batch pos"], names: list[str]) -> dict[str, Tensor]:
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=names)
    return {n: cache[n] for n in names}


def by_unit(level: UnitLevel, rows: list[Tensor]) -> Tensor:
    """[layer head_index] for heads, [d_mlp] for the neurons of one layer."""
    return torch.stack(rows) if isinstance(level, Heads) else rows[0]


def attribution_patching(model: Model, tokens: Int[Tensor, "batch pos"], metric: Metric,
                         level: "str | UnitLevel" = HEADS, layer: int | None = None,
                         corrupted: Tensor | None = None, absolute: bool = True) -> Tensor:
    """Attribution patching (Nanda 2023; Syed et al. 2023): (a − a_ref) · ∂metric/∂a at the clean
    run, summed over batch and positions, with a_ref the corrupted run's activation (or zero).
    It is the first-order Taylor estimate of metric(clean) − metric(a patched to a_ref).
    `absolute=True` returns its magnitude (the usual ranking). Heads: [layer head_index];
    Neurons(layer): [d_mlp]. `layer` belongs to the deprecated ("neurons", layer) form."""
    level = as_level(level, layer)
    names = unit_hooks(model, level)
    check_corrupted(tokens, corrupted)
    acts, grads = activations_and_gradients(model, tokens, metric, names)
    refs = cached(model, corrupted, names) if corrupted is not None else {
        n: torch.zeros_like(a) for n, a in acts.items()}
    scores = by_unit(level, [unit_sum((acts[n] - refs[n]) * grads[n], n) for n in names])
    return scores.abs() if absolute else scores


def activation_norm(model: Model, tokens: Int[Tensor, "batch pos"],
                    level: "str | UnitLevel" = HEADS, layer: int | None = None) -> Tensor:
    """‖activation‖₂ over positions (and d_head), averaged over the batch: each head's z, or each
    neuron's activation. Heads: [layer head_index]; Neurons(layer): [d_mlp]."""
    level = as_level(level, layer)
    names = unit_hooks(model, level)
    acts = cached(model, tokens, names)
    if isinstance(level, Heads):
        return torch.stack([acts[n].pow(2).sum((1, 3)).sqrt().mean(0) for n in names])
    return acts[names[0]].pow(2).sum(1).sqrt().mean(0)


def neuron_activation(model: Model, tokens: Int[Tensor, "batch pos"], layer: int
                      ) -> Float[Tensor, " d_mlp"]:
    """The raw (signed) activation of each neuron of `layer` at the last position, batch mean."""
    (name,) = unit_hooks(model, Neurons(layer))
    return cached(model, tokens, [name])[name][:, -1].mean(0)


def random_scores(shape: tuple[int, ...], seed: int = 0) -> Tensor:
    """Uniform random scores: the ranking any method has to beat."""
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def activation_patching(model: Model, tokens: Int[Tensor, "batch pos"], metric: Metric,
                        level: "str | UnitLevel" = HEADS, layer: int | None = None,
                        corrupted: Tensor | None = None, chunk: int = 64) -> Tensor:
    """Exact patching, the causal reference: metric(clean) − metric(clean run with ONE head's z,
    or one neuron's activation, replaced by its corrupted-run value, or by zero when `corrupted`
    is None: zero-ablation), everything downstream free. `chunk` units ride in one forward as
    copies of the batch. Heads: [layer head_index]; Neurons(layer): [d_mlp]."""
    level = as_level(level, layer)
    names = unit_hooks(model, level)
    check_corrupted(tokens, corrupted)
    refs = cached(model, corrupted, names) if corrupted is not None else dict.fromkeys(names)
    with torch.no_grad():
        base = metric(model(tokens))
    width = model.cfg.n_heads if isinstance(level, Heads) else model.cfg.d_mlp
    index = (lambda i: (slice(None), i)) if isinstance(level, Heads) else (lambda i: (Ellipsis, i))
    return by_unit(level, [base - patch.patch_each(
        model, tokens, [patch.Patch(name, index(i), refs[name]) for i in range(width)], metric, chunk)
        for name in names])
