"""Token-level faithfulness: Disrupt-top / Recover-top by deleting tokens, AOPC, hit rate.

A method's `[batch pos]` scores rank the processable positions (all but the BOS first token and
the last token, which are always kept). Disrupt-top deletes the top-k of them, Recover-top keeps
only the top-k (deleting the rest), for k = max(1, int(p·(N−2))), p = 10, 20, …, 100%. Token ids
are deleted, so the sequence gets shorter (the paper deletes words and re-tokenises; on
token-level tasks deleting ids is the same operation). The answer's probability at the (new) last
position is compared with the clean one: |p_clean − p_masked| / p_clean × 100, capped at 100,
averaged over prompts. Disrupt: higher is better; Recover: lower is better.
"""

from collections.abc import Callable, Sequence

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from tl_depass.evaluate.baselines import delete_positions

LogitsFn = Callable[[Tensor], Tensor]  # a model, or any tokens -> logits function
PERCENTS: tuple[int, ...] = (10, 20, 30, 40, 50, 60, 70, 80, 90, 100)


def n_selected(percent: int, n_positions: int) -> int:
    """k = max(1, int(p·(N−2))) over the N−2 processable positions; integer percentages avoid
    float truncation (int(0.29·100) is 28)."""
    if not 0 < percent <= 100:
        raise ValueError(f"percent must be in (0, 100], got {percent}")
    if n_positions < 3:
        raise ValueError(f"need at least 3 positions (BOS, one token, last), got {n_positions}")
    return max(1, percent * (n_positions - 2) // 100)


def ranked_positions(scores: Float[Tensor, "batch pos"]) -> Int[Tensor, "batch processable"]:
    """The processable positions 1..N−2 of each row, highest score first (ties: earlier position
    first; NaN ranks last)."""
    inner = scores[:, 1:-1].nan_to_num(nan=-torch.inf)
    return torch.argsort(inner, dim=1, descending=True, stable=True) + 1


def deletion_mask(scores: Float[Tensor, "batch pos"], percent: int, mode: str
                  ) -> Bool[Tensor, "batch pos"]:
    """True where a token is deleted. "disrupt": the top-k processable positions; "recover": every
    processable position except the top-k. BOS (position 0) and the last position are never
    deleted."""
    batch, n = scores.shape
    top = ranked_positions(scores)[:, : n_selected(percent, n)]
    chosen = torch.zeros(batch, n, dtype=torch.bool, device=scores.device)
    chosen.scatter_(1, top, True)
    if mode == "disrupt":
        return chosen
    if mode == "recover":
        inner = torch.zeros_like(chosen)
        inner[:, 1:-1] = True
        return inner & ~chosen
    raise ValueError(f"mode must be 'disrupt' or 'recover', got {mode!r}")


def relative_change(p_clean: Float[Tensor, " batch"], p_masked: Float[Tensor, " batch"]
                    ) -> Float[Tensor, " batch"]:
    """|p_clean − p_masked| / p_clean × 100, capped at 100."""
    return ((p_clean - p_masked).abs() / p_clean * 100).clamp(max=100)


def answer_prob(model: LogitsFn, tokens: Int[Tensor, "batch pos"], answers: Int[Tensor, " batch"]
                ) -> Float[Tensor, " batch"]:
    with torch.no_grad():
        probs = model(tokens)[:, -1].softmax(-1)
    return probs.gather(-1, answers[:, None].to(probs.device))[:, 0]


def deletion_curves(model: LogitsFn, tokens: Int[Tensor, "batch pos"], answers: Int[Tensor, " batch"],
                    scores: Float[Tensor, "batch pos"], percents: Sequence[int] = PERCENTS
                    ) -> dict[str, Float[Tensor, "percent batch"]]:
    """The Disrupt-top and Recover-top curves: the relative change (%) of each prompt at each p
    (average over the batch axis for the curve)."""
    p_clean = answer_prob(model, tokens, answers)
    curves: dict[str, list[Tensor]] = {"disrupt": [], "recover": []}
    for percent in percents:
        for mode, values in curves.items():
            shorter = delete_positions(tokens, deletion_mask(scores, percent, mode))
            values.append(relative_change(p_clean, answer_prob(model, shorter, answers)))
    return {mode: torch.stack(values) for mode, values in curves.items()}


def summarise(curves: dict[str, Float[Tensor, "percent batch"]]) -> dict[str, float]:
    """AOPC-style areas: the mean of each curve over p, the mean gap between them, and the
    standard error over prompts of each."""
    aopc = {mode: c.mean(0) for mode, c in curves.items()}  # per prompt
    aopc["area_between"] = aopc["disrupt"] - aopc["recover"]
    out = {}
    for name, key in [("disrupt", "disrupt_aopc"), ("recover", "recover_aopc"),
                      ("area_between", "area_between")]:
        values = aopc[name]
        out[key] = values.mean().item()
        se = values.std() / values.numel() ** 0.5 if values.numel() > 1 else values.new_tensor(0.0)
        out[f"{key}_se"] = se.item()
    return out


def hit_rate(scores: Float[Tensor, "batch pos"], key_positions: Bool[Tensor, "batch pos"]) -> float:
    """Fraction of prompts whose top-scored processable position is a ground-truth key position."""
    top = ranked_positions(scores)[:, 0]
    return key_positions.gather(1, top[:, None].to(key_positions.device)).float().mean().item()


def chance_hit_rate(key_positions: Bool[Tensor, "batch pos"]) -> float:
    """The hit rate of a uniformly random choice among the processable positions."""
    return key_positions[:, 1:-1].float().mean().item()
