"""One decomposed forward: the component axis folded into the batch axis, frozen values replayed.

Slots of a folded forward, per group of components (one group per layer for heads, say): `k`
components, a zero probe, the group's bias. Every bias term the model adds lands in every slot;
at each hook that follows a bias (and at every norm output) the
probe, which started at zero, holds exactly what was added, so subtracting it leaves each
component its pure share and the bias slot the whole bias path. Exact zeros stay exact zeros.
The fast forwards of engine/fast.py add their biases to the bias slot only (`add_bias`): after
them the probe is still zero and nothing is subtracted.
"""

import contextlib
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import einops
import torch
from jaxtyping import Bool, Int
from torch import Tensor

from tl_depass.engine import rules, through
from tl_depass.engine.backends import Model, forward_as_recorded, is_bridge
from tl_depass.engine.clean_run import CleanRun, unflatten_rows
from tl_depass.engine.fast import FastPaths, fast_paths, skipping_frozen
from tl_depass.engine.fast_bridge import frozen_attention, skipping_frozen_bridge, starting_at
from tl_depass.engine.groups import Entry
from tl_depass.engine.hooks import resid_pre
from tl_depass.engine.plan import MLPSite, Plan, mlp_site
from tl_depass.engine.slots import attend, correct, fold

__all__ = ["FoldedForward", "MLPSite", "Plan", "RuleSetup", "attend", "mlp_site"]


@dataclass(frozen=True)
class RuleSetup:
    rule: rules.Rule
    temperature: float
    excluded: Bool[Tensor, "component batch pos"]  # ignore_bos exclusions


class FoldedForward:
    """The hooks of one folded forward: for every group of `plan`, components `offset .. offset+k`,
    then the group's probe and bias. Slots fold into the batch axis group-major. `stats`: the
    non-linear rule's statistics over all components at each MLP (chunked runs), by MLP prefix.
    `window`: the forward covers positions `window` onwards only, where the components are all
    exactly zero before it (`Entry.first`); there the bias slot, which needs every position, is
    not this forward's to give (`run_chunks` takes it from the chunk at offset 0, window 0).

    `kept(...)` runs the whole forward and returns the kept values; `statistics(site, ...)` runs
    it up to MLP `site` and returns this chunk's part of the statistics there. Chunks in lockstep
    (engine/together.py) set `meet` (this chunk's statistics at an MLP -> all chunks') and `sink`
    (where each kept value goes as it is kept)."""

    meet: Callable[[rules.Stats], rules.Stats] | None = None
    sink: Callable[[str, Tensor], None] | None = None

    def __init__(self, model: Model, clean: CleanRun, plan: Plan, setup: RuleSetup,
                 offset: int, k: int, stats: Mapping[str, rules.Stats], window: int = 0):
        if window:  # every component here is exactly zero before `window`: run from there
            clean, plan = clean.window(window), plan.window(window)
            setup = RuleSetup(setup.rule, setup.temperature, setup.excluded[..., window:])
            stats = {name: s.window(window) for name, s in stats.items()}
        self.model, self.clean, self.plan, self.setup, self.stats = model, clean, plan, setup, stats
        self.window = window
        self.groups, self.offset, self.k = plan.groups, offset, k
        self.batch = clean.logits.shape[0]
        self.width = k + 2
        self.slots = len(self.groups) * self.width
        # Contributors to MLP shares: the components, the probe (g == 0, so never counted), bias.
        device = setup.excluded.device  # the tokens' (and the model's) device
        self.index = torch.arange(offset, offset + k + 2, device=device)
        self.index[k:k + 1].fill_(-1), self.index[k + 1:].fill_(plan.total)  # probe, bias (fill_:
        flags = setup.excluded.new_zeros((2, *setup.excluded.shape[1:]))  # no host sync on CUDA)
        flags[0].fill_(True)  # the probe is excluded everywhere, the bias nowhere
        excluded = torch.cat([setup.excluded[offset:offset + k], flags])
        # None where no component is excluded (the probe's g is exactly zero, so never counted)
        self.excluded = einops.repeat(excluded, "w b p -> w (g b) p", g=len(self.groups)) \
            if bool(setup.excluded[offset:offset + k].any()) else None

    def view(self, x: Tensor) -> Tensor:
        return x.unflatten(0, (len(self.groups), self.width, self.batch))

    # --- hook functions (each returns a new tensor; `stash` and `out` live for one forward) ---
    def enter(self, entries: list[tuple[int, Entry]]) -> Callable:
        def hook(x, hook):
            x = self.view(x).clone()
            w = self.window
            for g, entry in entries:
                x[g, :self.k] = entry.rows(self.offset, self.k)[:, :, w:]
                x[g, self.k] = 0
                x[g, self.k + 1] = 0 if entry.bias is None else entry.bias[:, w:]
            return fold(x)
        return hook

    def replay(self, name: str) -> Callable:
        value = self.clean[name]
        return lambda x, hook: value.repeat(self.slots, *[1] * (value.ndim - 1))

    def stash(self, stash: dict, key: str, corrected: bool = True) -> Callable:
        """Keep the hook's value (with `corrected`, after subtracting the probe) for a later hook."""
        def hook(x, hook):
            stash[key] = x = fold(correct(self.view(x))) if corrected else x
            return x
        return hook

    def add_bias(self, x: Tensor, b: Tensor | None) -> Tensor:
        """`b` added to every group's bias slot of `x`, a fresh folded tensor of a fast forward
        (engine/fast.py), in place."""
        if b is not None:
            self.view(x)[:, -1] += b.to(x.device)
        return x

    def attention(self, stash: dict, attn: str) -> Callable:
        pattern = self.clean[f"{attn}.hook_pattern"]

        def hook(z, hook):
            return attend(pattern, stash.pop(attn).unflatten(0, (self.slots, self.batch)))
        return hook

    def attend(self, attn: str) -> Callable[[Tensor], Tensor]:
        """z from every slot's (corrected) values and the clean pattern (fast attention)."""
        pattern = self.clean[f"{attn}.hook_pattern"]
        return lambda v: attend(pattern, v.unflatten(0, (self.slots, self.batch)))

    def pre_activations(self, stash: dict, site: MLPSite) -> Tensor:
        """The corrected MLP input of every slot, [slot, group*batch, pos, d_mlp]."""
        return einops.rearrange(self.view(stash.pop(site.prefix)), "g w b ... -> w (g b) ...")

    def activate(self, stash: dict, site: MLPSite, overwrite: bool = False) -> Callable:
        """The rule's shares at MLP `site`'s activation hook. `overwrite`: nothing else holds the
        stashed pre-activations (engine/fast.py's MLP, hook_pre neither kept nor hooked by the
        user), whose storage the shares then reuse."""
        n, s = len(self.groups), self.setup
        facts = rules.NeuronFacts(*(einops.repeat(t, "b ... -> (g b) ...", g=n)
                                    for t in (site.facts.act, site.facts.extra, site.facts.ratio)))

        def hook(post, hook):
            g, meet = self.pre_activations(stash, site), None
            if self.meet is not None:  # chunks in lockstep: statistics over every position
                if self.offset:  # the bias slot counts in the chunk at offset 0 only (this one's
                    g[-1] = 0  # values are never read: `run_chunks`), so it is left out here
                meet = lambda part: self.meet(part.padded(self.window)).window(self.window)  # noqa: E731
            share = rules.shares(s.rule, g, self.excluded, self.index, s.temperature, facts,
                                 self.stats.get(site.prefix), overwrite, meet)
            return einops.rearrange(share, "w (g b) ... -> (g w b) ...", g=n)
        return hook

    def collect(self, stash: dict, site: MLPSite, out: dict) -> Callable:
        """At MLP `site`: this chunk's statistics into `out["stats"]` (the value is left as is;
        the forward stops after this block)."""
        s = self.setup

        def hook(post, hook):
            g = self.pre_activations(stash, site)
            ex = self.excluded
            part = rules.stats(s.rule, g[:-2], None if ex is None else ex[:-2], self.index[:-2],
                               s.temperature)
            if self.offset == 0:  # the bias slot is the same in every chunk: count it once
                bias = rules.stats(s.rule, g[-1:], None if ex is None else ex[-1:], self.index[-1:],
                                   s.temperature)
                part = rules.combine(s.rule, bias, part)
            out["stats"] = part
        return hook

    def fix(self, x, hook):
        return fold(correct(self.view(x)))

    def keeper(self, out: dict, name: str) -> Callable:
        def hook(x, hook):
            if self.sink is None:
                out[name] = self.view(x)
            else:
                self.sink(name, self.view(x))
        return hook

    def unembed_rows(self, logits: bool) -> Callable:
        """At `unembed.hook_in`: only the kept position of each batch row goes on to the
        unembedding ([slots*batch, 1, d_model]); `logits=False`: no position does. (The kept
        logits equal `logits="all"`'s to rounding: BLAS may block a matrix of other row count
        differently.)"""
        def hook(x, hook):
            if not logits:
                return x[:, :0]
            rows = torch.arange(self.batch, device=x.device)
            return fold(self.view(x)[:, :, rows, self.plan.logit_positions.to(x.device)])[:, None]
        return hook

    def norm_hook(self, module, args, out):
        return self.rowwise(lambda x, hook: fold(correct(self.view(x))))(out, None)

    def rowwise(self, fn: Callable) -> Callable:
        """`fn` on [slots*batch, pos, ...] also where the model flattens the token axes
        (`unflatten_rows`)."""
        rows, pos = self.slots * self.batch, self.clean.logits.shape[1]

        def hook(x, hook):
            if not (x.is_floating_point() and x.ndim == 2 and x.shape[0] % (rows * pos) == 0):
                return fn(x, hook)
            out = fn(unflatten_rows(x, rows, pos), hook)
            return None if out is None else out.reshape(x.shape)
        return hook

    # --- wiring ---
    def hooks(self, out: dict, collect: MLPSite | None = None, fast: FastPaths | None = None,
              bridge_attn: set[str] | None = None) -> list[tuple[str, Callable]]:
        """The hooks of one forward, which write into `out`: the kept values, or with `collect`,
        the statistics at that MLP (no MLP after it is replayed: the forward stops there).
        Modules in `fast` (engine/fast.py) add their biases to the bias slot only: nothing after
        them is corrected. Attention in `fast.attn` or `bridge_attn` (engine/fast_bridge.py, whose
        biases land in every slot: hook_v is corrected) computes z itself."""
        p, stash, hooks = self.plan, {}, []
        fast, bridge_attn = fast or FastPaths(), bridge_attn or set()
        after = set(self.clean.after(p.start))
        entries: dict[str, list] = {}
        for g, group in enumerate(self.groups):
            for entry in group.entries:
                entries.setdefault(entry.hook, []).append((g, entry))
        # Components entering at a hook the pass stashes (a weight's output, e.g. mlp.hook_pre)
        # enter before the stash; everywhere else after the replay (which they override).
        early = [n for n in entries if n.endswith(("attn.hook_v", "mlp.hook_pre"))]
        hooks += [(hook, self.enter(entries.pop(hook))) for hook in early]
        hooks += [(n, self.replay(n)) for n in after if n.endswith("hook_scale")]
        hooks += [(f"{attn}.hook_v", self.fix) for attn in p.attn if attn in bridge_attn]
        for attn in (a for a in p.attn if a not in fast.attn | bridge_attn):
            hooks += [(f"{attn}.hook_v", self.stash(stash, attn)),
                      (f"{attn}.hook_z", self.attention(stash, attn))]
        mlps = p.mlps if collect is None else p.mlps[:p.mlps.index(collect) + 1]
        for site in mlps:
            pre = f"{site.prefix}.hook_pre"
            stash_pre = self.stash(stash, site.prefix, site.prefix not in fast.mlps)
            overwrite = (site.prefix in fast.mlps and pre not in p.keep
                         and not self.model.get_submodule(pre)._forward_hooks)  # none of the user's
            hooks += [(pre, stash_pre), (site.act_hook, self.collect(stash, site, out) if site is collect
                                         else self.activate(stash, site, overwrite))]
        # a fast module's output (blocks.L.hook_attn_out, blocks.L.hook_mlp_out) has no probe to take off
        unbiased = {re.sub(r"\.(attn|mlp)$", r".hook_\1_out", m) for m in fast.attn | fast.mlps}
        hooks += [(n, self.fix) for n in p.correct if n not in unbiased]
        hooks += [(hook, self.enter(es)) for hook, es in entries.items()]
        if collect is None:
            hooks += [(n, self.keeper(out, n)) for n in p.keep]
        logits = p.logits and collect is None
        if p.logit_positions is not None or not logits:  # after any keeper of the full input
            hooks.append(("unembed.hook_in", self.unembed_rows(logits)))
        return [(n, self.rowwise(fn)) for n, fn in hooks]

    def run(self, tokens: Int[Tensor, "batch pos"], attention_mask: Tensor | None,
            collect: MLPSite | None = None, stop: int | None = None) -> dict:
        model, out, p, w = self.model, {}, self.plan, self.window
        tokens = tokens[:, w:]
        mask = None if attention_mask is None else attention_mask[:, w:].repeat(self.slots, 1)
        options = {} if collect is None else {"stop_at_layer": collect.layer + 1}
        if stop is not None:
            options["stop_at_layer"] = stop
        block: dict[str, Tensor] = {}
        start = contextlib.nullcontext()
        if p.through is not None:  # block L only for the rest, probe and bias
            folded, block = through.after_mlp(
                self, tokens, None if attention_mask is None else attention_mask[:, w:])
        elif p.start_layer:  # the blocks before the entry are never run
            folded = self.clean[resid_pre(p.start_layer)].repeat(self.slots, 1, 1)
        if not p.start_layer:
            folded = tokens.repeat(self.slots, 1)
        elif is_bridge(model):  # engine/fast_bridge.py
            start, folded = starting_at(model, p.start_layer, folded), tokens.repeat(self.slots, 1)
        else:
            options["start_at_layer"] = p.start_layer
        fast = self.fast_paths()
        replaced = p.mlps if collect is None else p.mlps[:p.mlps.index(collect)]  # hook_post overridden
        bridge_attn = frozen_attention(model, p.attn, p.keep)  # engine/fast_bridge.py (Bridges only)
        bridge_fast = skipping_frozen_bridge(model, [(s.prefix, s.act_hook) for s in replaced], p.norms,
                                             bridge_attn, self.attend, p.keep)
        handles = [model.get_submodule(n).register_forward_hook(self.norm_hook)
                   for n in p.norms if n not in fast.norms]
        try:
            with forward_as_recorded(model), start, bridge_fast, \
                    skipping_frozen(model, fast, self.attend, self.add_bias), \
                    model.hooks(fwd_hooks=self.hooks(out, collect, fast, bridge_attn)):
                model(folded, attention_mask=mask, **options)
        finally:
            for h in handles:
                h.remove()
        return out if collect is not None else out | block

    def fast_paths(self) -> FastPaths:
        """The modules of this plan that run their fast forward (engine/fast.py); call it before
        the pass's hooks are added."""
        p = self.plan
        return fast_paths(self.model, p.attn, [(s.prefix, s.act_hook) for s in p.mlps], p.norms, p.keep)

    def kept(self, tokens: Int[Tensor, "batch pos"], attention_mask: Tensor | None
             ) -> dict[str, Tensor]:
        """The kept values of every slot, [group, slot, batch, ...] by hook (positions `window`
        onwards)."""
        return self.run(tokens, attention_mask)

    def statistics(self, site: MLPSite, tokens: Int[Tensor, "batch pos"],
                   attention_mask: Tensor | None) -> rules.Stats:
        """This chunk's part of the non-linear rule's statistics at MLP `site` (every position)."""
        site = next(s for s in self.plan.mlps if s.prefix == site.prefix)  # this window's
        return self.run(tokens, attention_mask, site)["stats"].padded(self.window)
