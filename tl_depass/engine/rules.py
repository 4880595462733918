"""MLP rules: how each neuron's clean activation is divided among the contributors.

Contributors are the components of one folded forward plus the bias component (always last).
`g` is each contributor's share of the neuron's pre-activation (gated MLPs: of the gate). The
non-linear rules need statistics over ALL components, so they are computed per chunk and
combined (`combine`), which makes chunked results equal to unchunked ones.
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

Rule = Literal["softmax", "max", "ratio"]
RULES = ("softmax", "max", "ratio")


@dataclass
class NeuronFacts:
    """Per MLP layer, from the clean run."""

    act: Float[Tensor, "batch pos d_mlp"]  # the activation a rule divides
    extra: Float[Tensor, "batch pos d_mlp"]  # what the model adds after the activation (to bias)
    ratio: Float[Tensor, "batch pos d_mlp"]  # d(post)/d(g) for the linear rule


def slope_at_zero(act_fn, d_mlp: int, like: Tensor) -> Tensor:
    z = torch.zeros(d_mlp, dtype=like.dtype, device=like.device, requires_grad=True)
    with torch.enable_grad():
        (grad,) = torch.autograd.grad(act_fn(z).sum(), z)
    return grad.detach()


def neuron_facts(act_fn, pre: Tensor, post: Tensor, up: Tensor | None) -> NeuronFacts:
    """`pre`: clean (gate) pre-activation; `post`: clean value at the overridden hook; `up`: the
    clean up projection of a gated MLP (None otherwise)."""
    slope0 = slope_at_zero(act_fn, pre.shape[-1], pre)
    if up is None:
        ratio = torch.where(pre != 0, post / pre, slope0)
        return NeuronFacts(post, torch.zeros_like(post), ratio)
    gate = act_fn(pre)
    act = gate * up
    ratio = torch.where(pre != 0, gate / pre, slope0) * up
    return NeuronFacts(act, post - act, ratio)


@dataclass
class Stats:
    """Per-neuron statistics over contributors: softmax (max of g/T, sum of exp) or max (best g,
    global index of the winner)."""

    top: Float[Tensor, "batch pos d_mlp"]
    rest: Tensor  # softmax: Float sum of exp(g/T - top); max: Int index of the winner

    def window(self, start: int) -> "Stats":
        """The statistics at positions `start` onwards."""
        return Stats(self.top[:, start:], self.rest[:, start:])

    def padded(self, start: int) -> "Stats":
        """Statistics of positions `start` onwards, with the `start` positions before them in
        which no contributor counted (what `combine` adds nothing from)."""
        if not start:
            return self
        top = self.top.new_full((self.top.shape[0], start, *self.top.shape[2:]), -torch.inf)
        rest = self.rest.new_zeros((self.rest.shape[0], start, *self.rest.shape[2:]))
        return Stats(torch.cat([top, self.top], 1), torch.cat([rest, self.rest], 1))


def _excluded(g: Tensor, excluded: Bool[Tensor, "slot batch pos"] | None) -> Tensor:
    """Contributors left out of a neuron's share: exact zeros, and the `excluded` ones (None:
    none is, which spares a pass over `g`)."""
    return g == 0 if excluded is None else (g == 0) | excluded[..., None]


def on_device(g: Tensor, index: Tensor, excluded: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """`index` and `excluded` (made with the tokens) on the device of `g`, the MLP's: a model
    spread over devices (n_devices, device_map) runs this MLP elsewhere. No copy where they are."""
    return index.to(g.device), None if excluded is None else excluded.to(g.device)


def stats(
    rule: Rule, g: Float[Tensor, "slot batch pos d_mlp"],
    excluded: Bool[Tensor, "slot batch pos"] | None, index: Int[Tensor, " slot"], temperature: float,
) -> Stats:
    index, excluded = on_device(g, index, excluded)
    out = _excluded(g, excluded)
    if rule == "softmax":
        scaled = (g / temperature).masked_fill_(out, -torch.inf)
        top = scaled.amax(0)
        safe = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
        return Stats(top, scaled.sub_(safe).exp_().sum(0))
    best, arg = g.masked_fill(out, -torch.inf).max(0)
    return Stats(best, index[arg])


def combine(rule: Rule, a: Stats | None, b: Stats) -> Stats:
    if a is None:
        return b
    if rule == "softmax":
        top = torch.maximum(a.top, b.top)
        safe = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
        return Stats(top, a.rest * torch.exp(a.top - safe) + b.rest * torch.exp(b.top - safe))
    take_b = (b.top > a.top) | ((b.top == a.top) & (b.rest < a.rest))
    return Stats(torch.where(take_b, b.top, a.top), torch.where(take_b, b.rest, a.rest))


def shares(
    rule: Rule, g: Float[Tensor, "slot batch pos d_mlp"],
    excluded: Bool[Tensor, "slot batch pos"] | None, index: Int[Tensor, " slot"], temperature: float,
    facts: NeuronFacts, total: Stats | None, overwrite: bool = False,
    meet: Callable[[Stats], Stats] | None = None,
) -> Float[Tensor, "slot batch pos d_mlp"]:
    """Each contributor's share of the clean post-activation (the last slot is the bias, which
    also receives `facts.extra` and any neuron with no contributor). `total` holds the statistics
    over all components (None: the slots here are all of them, or `meet` turns the statistics of
    the slots here into those of all: chunks in lockstep, engine/together.py). `overwrite`:
    nothing reads `g` afterwards, so the linear and softmax rules compute the shares in its
    storage."""
    if rule == "ratio":
        return finish(g.mul_(facts.ratio) if overwrite else g * facts.ratio, facts)
    index, excluded = on_device(g, index, excluded)
    out_mask = _excluded(g, excluded)
    if rule == "softmax":  # written out, in place: half the time of torch.softmax over dim 0
        scaled = (g.div_(temperature) if overwrite else g / temperature).masked_fill_(out_mask, -torch.inf)
        top = scaled.amax(0) if total is None else total.top
        weight = scaled.sub_(torch.where(torch.isfinite(top), top, torch.zeros_like(top))).exp_()
        rest = weight.sum(0) if total is None else total.rest
        if meet is not None:  # the weights so far are relative to this chunk's top: rescale
            total = meet(Stats(top, rest))
            weight.mul_(torch.where(torch.isfinite(top), torch.exp(top - total.top), 0))
            rest = total.rest
        nobody = rest == 0  # rest >= 1 (the top term) unless every contributor is left out
        weight.mul_(facts.act / rest.masked_fill(nobody, 1.0))
        weight[-1] += torch.where(nobody, facts.act, 0)  # nobody left: all to the bias
        return finish(weight, facts)
    total = total or stats(rule, g, excluded, index, temperature)
    if meet is not None:
        total = meet(total)
    orphan = ~torch.isfinite(total.top)
    out = ((index[:, None, None, None] == total.rest) & ~orphan).to(g.dtype).mul_(facts.act)
    out[-1] += torch.where(orphan, facts.act, 0)
    return finish(out, facts)


def finish(out: Tensor, facts: NeuronFacts) -> Tensor:
    """Add what the model adds after the activation (TL's gated b_in) to the bias (last slot)."""
    out[-1] += facts.extra
    return out
