"""Reading a result at answers and positions: token ids of the answers (ids, strings, one per
row), the wrong answers, one readout position per batch row, and per-unit score grids."""

import torch
from jaxtyping import Float, Int
from torch import Tensor

from tl_depass.engine.backends import Model
from tl_depass.engine.validate import token_of
from tl_depass.errors import DepassError
from tl_depass.levels.label import Label

Answer = int | str | list | Tensor


def unit_grid(labels: list[Label], score: Float[Tensor, "component batch"], kind: str,
              shape: tuple[int, int]) -> Float[Tensor, "batch layer index"]:
    """`score` of the components of `kind` ("head", "neuron") laid out by (layer, index), NaN
    where no component is; DepassError if there is none."""
    out = torch.full((score.shape[1], *shape), torch.nan, dtype=score.dtype)
    found = [(c, label) for c, label in enumerate(labels) if label.kind == kind]
    if not found:
        old = all(label.kind == "unknown" for label in labels)
        raise DepassError(f"no {kind} components in this decomposition; " + (
            "it was saved by an older tl_depass, without structured labels: decompose again"
            if old else "decompose with the matching level"))
    for c, label in found:
        out[:, label.layer, label.index] = score[c]
    return out


def answer_ids(model: Model, answer: Answer, batch: int, d_vocab: int, device) -> Int[Tensor, " batch"]:
    """One token id per batch row from an id, a token string, or one per row (ids or strings)."""
    if isinstance(answer, str):
        answer = token_of(model, answer, "answer")
    elif isinstance(answer, list):
        answer = [token_of(model, a, "answer") if isinstance(a, str) else a for a in answer]
    try:
        ids = torch.as_tensor(answer, device=device)
    except (TypeError, ValueError, RuntimeError):
        raise DepassError(f"answers must be token ids or token strings, got {answer!r:.80}") from None
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise DepassError(f"answer ids must be integers, got {ids.dtype}: pass token ids")
    ids = ids.long().reshape(-1)
    if ids.numel() == 1:
        ids = ids.expand(batch)
    if ids.numel() != batch:
        raise DepassError(f"got {ids.numel()} answers for a batch of {batch}")
    if ((ids < 0) | (ids >= d_vocab)).any():
        raise DepassError(f"answer ids {ids.tolist()} outside the vocabulary [0, {d_vocab})")
    return ids


def check_wrong(answer: Tensor, wrong: Tensor) -> Tensor:
    """The wrong answer ids, which must differ from the answer (else the difference is 0)."""
    same = torch.nonzero(answer == wrong).flatten().tolist()
    if same:
        raise DepassError(f"the wrong answer equals the answer in batch rows {same[:5]}: their "
                          "logit difference is 0; pass another wrong answer, or wrong=None")
    return wrong


def readout_positions(tokens: Tensor, attention_mask: Tensor | None, pos: int | Tensor
                      ) -> Int[Tensor, " batch"]:
    """One position per batch row (negative counts from the end), never a padded one."""
    batch, n = tokens.shape
    pos = torch.as_tensor(pos, device=tokens.device)
    if (pos.is_floating_point() or pos.is_complex() or pos.dtype == torch.bool
            or pos.numel() not in (1, batch)):
        raise DepassError(f"position must be one int or one int per batch row ({batch}); got "
                          f"{pos.numel()} of {pos.dtype}")
    pos = pos.long().reshape(-1).expand(batch)
    if ((pos < -n) | (pos >= n)).any():
        raise DepassError(f"position {pos.tolist()} out of range for {n} positions")
    pos = pos % n
    if attention_mask is not None:
        padded = attention_mask[torch.arange(batch), pos] == 0
        if padded.any():
            rows = torch.nonzero(padded).flatten().tolist()
            raise DepassError(
                f"position {pos.tolist()} is padding in batch rows {rows}; pass one position "
                "per row, e.g. pos=attention_mask.sum(1) - 1 for right padding"
            )
    return pos
