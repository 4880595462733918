"""Component-level faithfulness: ablate the heads (or the neurons of one layer) a method ranks
highest, or lowest, and measure what the model still gets right; and how well each method's
scores agree with the exact per-unit causal effects.

Scores are `[layer head_index]` for heads and `[d_mlp]` for neurons, one ranking per task (the
batch mean), as `tl_depass.evaluate.baselines` returns them. Ablation is zero-ablation of every position
(`attn.hook_z` of the head, or `mlp.hook_post` of the neuron), everything else free.
"""

from collections.abc import Sequence

import pandas as pd
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

FRACTIONS: tuple[float, ...] = (0.02, 0.05, 0.1, 0.2, 0.3, 0.5)


def n_units(fraction: float, total: int) -> int:
    """k = max(1, int(fraction·total)) (rounded first, so 0.3·10 is 3, not 2)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    return max(1, int(round(fraction * total, 9)))


def selection(scores: Tensor, k: int, which: str) -> Tensor:
    """Bool mask (shape of `scores`) of the k highest ("top") or k lowest ("bottom") scores;
    ties are broken by index; NaN scores come last either way."""
    if which not in ("top", "bottom"):
        raise ValueError(f"which must be 'top' or 'bottom', got {which!r}")
    flat = scores.flatten().nan_to_num(nan=-torch.inf if which == "top" else torch.inf)
    order = torch.argsort(flat, descending=which == "top", stable=True)
    mask = torch.zeros(flat.shape, dtype=torch.bool, device=scores.device)
    mask[order[:k]] = True
    return mask.reshape(scores.shape)


def ablation_hooks(ablate: Tensor, level: str, layer: int | None = None) -> list:
    """Forward hooks zeroing the selected heads (`ablate` is [layer head_index]) or neurons of
    `layer` (`ablate` is [d_mlp]) at every position."""
    if level == "heads":
        def zero_heads(z: Tensor, hook, keep: Tensor) -> Tensor:
            return z * keep[:, None].to(z)
        return [(f"blocks.{i}.attn.hook_z", lambda z, hook, keep=~row: zero_heads(z, hook, keep))
                for i, row in enumerate(ablate) if row.any()]
    if level == "neurons":
        return [(f"blocks.{layer}.mlp.hook_post", lambda a, hook: a * (~ablate).to(a))]
    raise ValueError(f"level must be 'heads' or 'neurons', got {level!r}")


def task_metrics(logits: Float[Tensor, "batch pos d_vocab"], answers: Int[Tensor, " batch"],
                 wrong: Int[Tensor, " batch"]) -> dict[str, float]:
    """Answer accuracy (top-1 at the last position) and mean logit(answer) − logit(wrong)."""
    last = logits[:, -1]
    rows = torch.arange(last.shape[0], device=last.device)
    return {"accuracy": (last.argmax(-1) == answers).float().mean().item(),
            "logit_diff": (last[rows, answers] - last[rows, wrong]).mean().item()}


def ablated_metrics(model, tokens: Int[Tensor, "batch pos"], answers: Int[Tensor, " batch"],
                    wrong: Int[Tensor, " batch"], ablate: Bool[Tensor, "..."], level: str,
                    layer: int | None = None) -> dict[str, float]:
    with torch.no_grad():
        logits = model.run_with_hooks(tokens, fwd_hooks=ablation_hooks(ablate, level, layer))
    return task_metrics(logits, answers, wrong)


def ablation_table(model, tokens: Int[Tensor, "batch pos"], answers: Int[Tensor, " batch"],
                   wrong: Int[Tensor, " batch"], scores: dict[str, Tensor], level: str,
                   layer: int | None = None, fractions: Sequence[float] = FRACTIONS) -> pd.DataFrame:
    """One row per (method, k, top/bottom): accuracy and mean logit difference after zero-ablating
    the method's k highest- or lowest-scored units. Fractions that give the same k are merged."""
    total = next(iter(scores.values())).numel()
    ks = list(dict.fromkeys(n_units(f, total) for f in fractions))
    rows = []
    for method, s in scores.items():
        for k in ks:
            for which in ("top", "bottom"):
                m = ablated_metrics(model, tokens, answers, wrong, selection(s, k, which), level, layer)
                rows.append({"method": method, "k": k, "percent": 100 * k / total, "ablated": which, **m})
    return pd.DataFrame(rows)


def correlations(scores: dict[str, Tensor], reference: Tensor) -> pd.DataFrame:
    """Pearson and Spearman of each method's scores with the reference effects, and Spearman with
    their magnitudes (for methods that score |effect|, like |attribution patching|)."""
    ref = pd.Series(reference.detach().flatten().double().cpu().numpy())
    rows = []
    for method, s in scores.items():
        x = pd.Series(s.detach().flatten().double().cpu().numpy())
        rows.append({"method": method, "pearson": x.corr(ref),
                     "spearman": x.rank().corr(ref.rank()),  # Pearson of ranks (no scipy)
                     "spearman_abs": x.rank().corr(ref.abs().rank())})
    return pd.DataFrame(rows)
