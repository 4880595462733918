"""The folded slot layout: `[group, slot, batch, ...]` folded group-major into the batch axis, each
group's slots its `k` components, then a zero probe, then the bias (engine/replay.py)."""

import einops
import torch
from jaxtyping import Float
from torch import Tensor

__all__ = ["attend", "correct", "fold"]


def fold(x: Tensor) -> Tensor:
    return einops.rearrange(x, "group slot batch ... -> (group slot batch) ...")


def correct(x: Tensor) -> Tensor:
    """Subtract each group's probe (its second-to-last slot) from every slot of the group but
    the bias (last): one kernel, and the probe itself becomes exactly zero."""
    weight = torch.ones(x.shape[1], *[1] * (x.ndim - 2), dtype=x.dtype, device=x.device)
    weight[-1] = 0
    return torch.addcmul(x, weight, x[:, -2:-1], value=-1)


def attend(pattern: Float[Tensor, "batch head_index query_pos key_pos"],
           v: Float[Tensor, "slot batch key_pos kv_head d_head"]
           ) -> Float[Tensor, "slot_batch query_pos head_index d_head"]:
    """hook_z from the clean pattern and each slot's values (GQA: kv heads repeated)."""
    if pattern.shape[1] != v.shape[3]:
        v = v.repeat_interleave(pattern.shape[1] // v.shape[3], dim=3)
    z = einops.einsum(pattern.to(v.dtype), v, "b h q k, s b k h d -> s b q h d")
    return z.flatten(0, 1)
