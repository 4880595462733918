"""One decomposed forward: the component axis folded into the batch axis, frozen values replayed.

Slots of a folded forward, per group of components (one group per layer for heads, say): `k`
components, a zero probe, the group's bias. Every bias term the model adds lands in every slot;
at each hook that follows a bias (and at every norm output) the
probe, which started at zero, holds exactly what was added, so subtracting it leaves each
component its pure share and the bias slot the whole bias path. Exact zeros stay exact zeros.
"""

from collections.abc import Callable
from dataclasses import dataclass, field

import einops
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from tl_depass.engine import rules
from tl_depass.engine.backends import act_fn, forward_as_recorded
from tl_depass.engine.clean_run import CleanRun
from tl_depass.levels.components import Entry, Group


class StopPass(Exception):
    """Raised inside a hook to end a forward early (statistics sweeps of chunked runs)."""


@dataclass
class MLPSite:
    prefix: str  # "blocks.3.mlp"
    act_hook: str  # the hook whose value DePass overrides (hook_post, or hook_mid for solu_ln)
    facts: rules.NeuronFacts


def mlp_site(model, clean: CleanRun, prefix: str) -> MLPSite:
    """The MLP at `prefix`: which hook DePass overrides, and the clean facts its rules use."""
    act_hook = f"{prefix}.hook_mid" if f"{prefix}.hook_mid" in clean.order else f"{prefix}.hook_post"
    gated = model.cfg.gated_mlp and act_hook.endswith("hook_post")
    up = clean[f"{prefix}.hook_pre_linear"] if gated else None
    facts = rules.neuron_facts(act_fn(model, prefix), clean[f"{prefix}.hook_pre"],
                               clean[act_hook], up)
    return MLPSite(prefix, act_hook, facts)


@dataclass
class Plan:
    """Everything a folded forward needs to know about the model, computed once."""

    start: str  # the first hook where components enter; DePass replays everything after it
    norms: list[str]  # norm modules after the entry (their outputs are corrected)
    attn: list[str]  # attention modules after the entry ("blocks.0.attn")
    mlps: list[MLPSite]
    keep: list[str]  # hooks whose per-component values are returned
    correct: list[str]  # hooks where the probe is subtracted
    # decompose(logits=...): one position per batch row whose logits are computed ([batch]), or
    # None for every position; `logits=False`: the forward stops before the unembedding.
    logit_positions: Tensor | None = None
    logits: bool = True


@dataclass
class RuleSetup:
    rule: rules.Rule
    temperature: float
    excluded: Bool[Tensor, "component batch pos"]  # ignore_bos exclusions
    stats: dict[str, rules.Stats] = field(default_factory=dict)  # over all components, per MLP
    collect: str | None = None  # MLP whose statistics this sweep gathers, then stops


def attend(pattern: Float[Tensor, "batch head_index query_pos key_pos"],
           v: Float[Tensor, "slot batch key_pos kv_head d_head"]
           ) -> Float[Tensor, "slot_batch query_pos head_index d_head"]:
    """hook_z from the clean pattern and each slot's values (GQA: kv heads repeated)."""
    v = v.repeat_interleave(pattern.shape[1] // v.shape[3], dim=3)
    z = einops.einsum(pattern.to(v.dtype), v, "b h q k, s b k h d -> s b q h d")
    return z.flatten(0, 1)


def fold(x: Tensor) -> Tensor:
    return einops.rearrange(x, "group slot batch ... -> (group slot batch) ...")


def correct(x: Tensor) -> Tensor:
    """Subtract each group's probe (its second-to-last slot) from every slot of the group but
    the bias (last): one kernel, and the probe itself becomes exactly zero."""
    weight = torch.ones(x.shape[1], *[1] * (x.ndim - 2), dtype=x.dtype, device=x.device)
    weight[-1] = 0
    return torch.addcmul(x, weight, x[:, -2:-1], value=-1)


class FoldedForward:
    """The hooks of one folded forward: for every group, components `offset .. offset+k` of
    `total`, then the group's probe and bias. Slots fold into the batch axis group-major."""

    def __init__(self, model, clean: CleanRun, plan: Plan, setup: RuleSetup,
                 groups: list[Group], offset: int, k: int, total: int):
        self.model, self.clean, self.plan, self.setup = model, clean, plan, setup
        self.groups, self.offset, self.k = groups, offset, k
        self.batch = clean.logits.shape[0]
        self.width = k + 2
        self.slots = len(groups) * self.width
        # Contributors to MLP shares: the components, the probe (g == 0, so never counted), bias.
        self.index = torch.cat([torch.arange(offset, offset + k), torch.tensor([-1, total])])
        excluded = torch.cat([setup.excluded[offset:offset + k],
                              torch.tensor([True, False]).reshape(2, 1, 1).expand(
                                  2, *setup.excluded.shape[1:])])
        self.excluded = einops.repeat(excluded, "w b p -> w (g b) p", g=len(groups))
        self.stash: dict[str, Tensor] = {}
        self.kept: dict[str, Tensor] = {}
        self.partial: rules.Stats | None = None

    def view(self, x: Tensor) -> Tensor:
        return x.unflatten(0, (len(self.groups), self.width, self.batch))

    # --- hook functions (each returns a new tensor) ---
    def enter(self, entries: list[tuple[int, Entry]]) -> Callable:
        def hook(x, hook):
            x = self.view(x).clone()
            for g, entry in entries:
                x[g, :self.k] = entry.rows(self.offset, self.k)
                x[g, self.k] = 0
                x[g, self.k + 1] = 0 if entry.bias is None else entry.bias
            return fold(x)
        return hook

    def replay(self, name: str) -> Callable:
        value = self.clean[name]
        return lambda x, hook: value.repeat(self.slots, *[1] * (value.ndim - 1))

    def stash_corrected(self, key: str) -> Callable:
        def hook(x, hook):
            self.stash[key] = x = fold(correct(self.view(x)))
            return x
        return hook

    def attention(self, attn: str) -> Callable:
        pattern = self.clean[f"{attn}.hook_pattern"]

        def hook(z, hook):
            return attend(pattern, self.stash.pop(attn).unflatten(0, (self.slots, self.batch)))
        return hook

    def activate(self, site: MLPSite) -> Callable:
        n = len(self.groups)
        facts = rules.NeuronFacts(*(einops.repeat(t, "b ... -> (g b) ...", g=n)
                                    for t in (site.facts.act, site.facts.extra, site.facts.ratio)))

        def hook(post, hook):
            g = einops.rearrange(self.view(self.stash.pop(site.prefix)),
                                 "g w b ... -> w (g b) ...")
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
            share = rules.shares(s.rule, g, self.excluded, self.index, s.temperature, facts,
                                 s.stats.get(site.prefix))
            return einops.rearrange(share, "w (g b) ... -> (g w b) ...", g=n)
        return hook

    def fix(self, x, hook):
        return fold(correct(self.view(x)))

    def keeper(self, name: str) -> Callable:
        def hook(x, hook):
            self.kept[name] = self.view(x)
        return hook

    def unembed_rows(self, x, hook):
        """At `unembed.hook_in`: only the kept position of each batch row goes on to the
        unembedding ([slots*batch, 1, d_model]); logits=None: the forward ends here."""
        if not self.plan.logits:
            raise StopPass
        rows = torch.arange(self.batch, device=x.device)
        return fold(self.view(x)[:, :, rows, self.plan.logit_positions])[:, None]

    def norm_hook(self, module, args, out):
        return self.rowwise(lambda x, hook: fold(correct(self.view(x))))(out, None)

    def rowwise(self, fn: Callable) -> Callable:
        """`fn` on [slots*batch, pos, ...] also where the model flattens the token axes."""
        pos = self.clean.logits.shape[1]

        def hook(x, hook):
            if not (x.is_floating_point() and x.ndim == 2 and x.shape[0] == self.slots * self.batch * pos):
                return fn(x, hook)
            out = fn(x.unflatten(0, (-1, pos)), hook)
            return None if out is None else out.flatten(0, 1)
        return hook

    # --- wiring ---
    def hooks(self) -> list[tuple[str, Callable]]:
        p = self.plan
        after = set(self.clean.after(p.start))
        entries: dict[str, list] = {}
        for g, group in enumerate(self.groups):
            for entry in group.entries:
                entries.setdefault(entry.hook, []).append((g, entry))
        # Components entering at a hook the pass stashes (a weight's output, e.g. mlp.hook_pre)
        # enter before the stash; everywhere else after the replay (which they override).
        early = [n for n in entries if n.endswith(("attn.hook_v", "mlp.hook_pre"))]
        hooks = [(hook, self.enter(entries.pop(hook))) for hook in early]
        hooks += [(n, self.replay(n)) for n in after if n.endswith("hook_scale")]
        for attn in p.attn:
            hooks += [(f"{attn}.hook_v", self.stash_corrected(attn)),
                      (f"{attn}.hook_z", self.attention(attn))]
        for site in p.mlps:
            hooks += [(f"{site.prefix}.hook_pre", self.stash_corrected(site.prefix)),
                      (site.act_hook, self.activate(site))]
        hooks += [(n, self.fix) for n in p.correct]
        hooks += [(hook, self.enter(es)) for hook, es in entries.items()]
        hooks += [(n, self.keeper(n)) for n in p.keep]
        if p.logit_positions is not None or not p.logits:  # after any keeper of the full input
            hooks.append(("unembed.hook_in", self.unembed_rows))
        return [(n, self.rowwise(fn)) for n, fn in hooks]

    def run(self, tokens: Int[Tensor, "batch pos"], attention_mask: Tensor | None) -> None:
        model = self.model
        folded = tokens.repeat(self.slots, 1)
        mask = None if attention_mask is None else attention_mask.repeat(self.slots, 1)
        handles = [model.get_submodule(n).register_forward_hook(self.norm_hook)
                   for n in self.plan.norms]
        try:
            with forward_as_recorded(model), model.hooks(fwd_hooks=self.hooks()):
                model(folded, attention_mask=mask)
        except StopPass:
            pass
        finally:
            for h in handles:
                h.remove()
