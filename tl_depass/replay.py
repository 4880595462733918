"""One decomposed forward: the component axis folded into the batch axis, frozen values replayed.

Slots of a folded forward, in order: `k` components, a zero probe, the bias. Every bias term the
model adds lands in every slot; at each hook that follows a bias (and at every norm output) the
probe, which started at zero, holds exactly what was added, so subtracting it leaves each
component its pure share and the bias slot the whole bias path. Exact zeros stay exact zeros.
"""

from collections.abc import Callable
from dataclasses import dataclass, field

import einops
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from tl_depass import rules
from tl_depass.clean_run import CleanRun


class StopPass(Exception):
    """Raised inside a hook to end a forward early (statistics sweeps of chunked runs)."""


@dataclass
class MLPSite:
    prefix: str  # "blocks.3.mlp"
    act_hook: str  # the hook whose value DePass overrides (hook_post, or hook_mid for solu_ln)
    facts: rules.NeuronFacts


@dataclass
class Plan:
    """Everything a folded forward needs to know about the model, computed once."""

    entry: str
    norms: list[str]  # norm modules after the entry (their outputs are corrected)
    attn: list[str]  # attention modules after the entry ("blocks.0.attn")
    mlps: list[MLPSite]
    keep: list[str]  # hooks whose per-component values are returned
    correct: list[str]  # hooks where the probe is subtracted
    logits_hook: str = "unembed.hook_out"


@dataclass
class RuleSetup:
    rule: rules.Rule
    temperature: float
    excluded: Bool[Tensor, "component batch pos"]  # ignore_bos exclusions
    stats: dict[str, rules.Stats] = field(default_factory=dict)  # over all components, per MLP
    collect: str | None = None  # MLP whose statistics this sweep gathers, then stops


def fold(x: Tensor) -> Tensor:
    return einops.rearrange(x, "slot batch ... -> (slot batch) ...")


def correct(x: Tensor, batch: int) -> Tensor:
    """Subtract the probe (second-to-last slot) from every slot but the bias (last): one kernel,
    and the probe itself becomes exactly zero."""
    x = x.unflatten(0, (-1, batch))
    weight = torch.ones(x.shape[0], *[1] * (x.ndim - 1), dtype=x.dtype, device=x.device)
    weight[-1] = 0
    return fold(torch.addcmul(x, weight, x[-2], value=-1))


class FoldedForward:
    """The hooks of one folded forward over components `offset .. offset+k` of `total`."""

    def __init__(self, model, clean: CleanRun, plan: Plan, setup: RuleSetup,
                 entry_states: Float[Tensor, "k batch pos d_model"], offset: int, total: int):
        self.model, self.clean, self.plan, self.setup = model, clean, plan, setup
        self.states, self.offset = entry_states, offset
        self.k, self.batch = entry_states.shape[0], entry_states.shape[1]
        self.slots = self.k + 2
        # Contributors to MLP shares: the components, the probe (g == 0, so never counted), bias.
        self.index = torch.cat([torch.arange(offset, offset + self.k), torch.tensor([-1, total])])
        self.excluded = torch.cat([setup.excluded[offset:offset + self.k],
                                   torch.tensor([True, False]).reshape(2, 1, 1).expand(
                                       2, *setup.excluded.shape[1:])])
        self.stash: dict[str, Tensor] = {}
        self.kept: dict[str, Tensor] = {}
        self.partial: rules.Stats | None = None

    # --- hook functions (each returns a new tensor) ---
    def enter(self, x: Tensor, hook) -> Tensor:
        probe_and_bias = self.states.new_zeros((2, *self.states.shape[1:]))
        return fold(torch.cat([self.states, probe_and_bias]).to(x.dtype))

    def replay(self, name: str) -> Callable:
        value = self.clean[name]
        return lambda x, hook: value.repeat(self.slots, *[1] * (value.ndim - 1))

    def stash_v(self, attn: str) -> Callable:
        def hook(x, hook):
            self.stash[attn] = x = correct(x, self.batch)
            return x
        return hook

    def attend(self, attn: str) -> Callable:
        pattern = self.clean[f"{attn}.hook_pattern"]

        def hook(z, hook):
            v = self.stash.pop(attn).unflatten(0, (self.slots, self.batch))
            v = v.repeat_interleave(pattern.shape[1] // v.shape[3], dim=3)  # GQA
            z = einops.einsum(pattern.to(v.dtype), v, "b h q k, s b k h d -> s b q h d")
            return fold(z)
        return hook

    def stash_pre(self, mlp: str) -> Callable:
        def hook(x, hook):
            self.stash[mlp] = x = correct(x, self.batch)
            return x
        return hook

    def activate(self, site: MLPSite) -> Callable:
        def hook(post, hook):
            g = self.stash.pop(site.prefix).unflatten(0, (self.slots, self.batch))
            s = self.setup
            if s.collect == site.prefix:
                part = rules.stats(s.rule, g[:-2], self.excluded[:-2], self.index[:-2],
                                   s.temperature)
                if self.offset == 0:  # the bias slot is the same in every chunk: count it once
                    bias = rules.stats(s.rule, g[-1:], self.excluded[-1:], self.index[-1:],
                                       s.temperature)
                    part = rules.combine(s.rule, bias, part)
                self.partial = part
                raise StopPass
            return fold(rules.shares(s.rule, g, self.excluded, self.index, s.temperature,
                                     site.facts, s.stats.get(site.prefix)))
        return hook

    def fix(self, x, hook):
        return correct(x, self.batch)

    def keeper(self, name: str) -> Callable:
        def hook(x, hook):
            self.kept[name] = x.unflatten(0, (self.slots, self.batch))
        return hook

    def norm_hook(self, module, args, out):
        return correct(out, self.batch)

    # --- wiring ---
    def hooks(self) -> list[tuple[str, Callable]]:
        p = self.plan
        after = set(self.clean.after(p.entry))
        hooks = [(p.entry, self.enter)]
        hooks += [(n, self.replay(n)) for n in after if n.endswith("hook_scale")]
        for attn in p.attn:
            hooks += [(f"{attn}.hook_v", self.stash_v(attn)), (f"{attn}.hook_z", self.attend(attn))]
        for site in p.mlps:
            hooks += [(f"{site.prefix}.hook_pre", self.stash_pre(site.prefix)),
                      (site.act_hook, self.activate(site))]
        hooks += [(n, self.fix) for n in p.correct]
        hooks += [(n, self.keeper(n)) for n in p.keep]
        return hooks

    def run(self, tokens: Int[Tensor, "batch pos"], attention_mask: Tensor | None) -> None:
        model = self.model
        folded = tokens.repeat(self.slots, 1)
        mask = None if attention_mask is None else attention_mask.repeat(self.slots, 1)
        handles = [model.get_submodule(n).register_forward_hook(self.norm_hook)
                   for n in self.plan.norms]
        try:
            with model.hooks(fwd_hooks=self.hooks()):
                model(folded, attention_mask=mask)
        except StopPass:
            pass
        finally:
            for h in handles:
                h.remove()
