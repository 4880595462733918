"""The plan of a decomposed pass, made once per call: which groups of components ride in each
folded forward, where they enter, which norms, attention and MLPs come after the entry (and are
replayed), which hooks are kept and where the probe is subtracted."""

import dataclasses
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import Tensor

from tl_depass.engine import bridge_mlp, fast_bridge, hooks, rules
from tl_depass.engine.backends import Model, act_fn, is_bridge
from tl_depass.engine.clean_run import CleanRun
from tl_depass.engine.validate import NOT_DECOMPOSABLE, RESIDUAL
from tl_depass.errors import DepassError

if TYPE_CHECKING:  # levels build on the engine; the engine only reads their groups
    from tl_depass.engine.groups import Group

# Hooks right after a bias is added (a Bridge's raw `o.hook_out` / `out.hook_out` fire where an
# adapter that delegates attention to HF has no `hook_attn_out`; correcting twice is a no-op).
BIASED = ("hook_attn_out", "hook_mlp_out", "unembed.hook_out", "attn.o.hook_out", "mlp.out.hook_out")
MLP_PRE = re.compile(r"blocks\.(\d+)\.mlp\.hook_pre")
MLP_POST = re.compile(r"blocks\.(\d+)\.mlp\.hook_post")
BLOCK = re.compile(r"blocks\.(\d+)\.")


@dataclass(frozen=True, eq=False)
class MLPSite:
    prefix: str  # "blocks.3.mlp"
    act_hook: str  # the hook whose value DePass overrides (hook_post, or hook_mid for solu_ln)
    facts: rules.NeuronFacts
    layer: int


def mlp_site(model: Model, clean: CleanRun, layer: int | str) -> MLPSite:
    """The MLP of block `layer` (or at the prefix "blocks.{layer}.mlp"): which hook DePass
    overrides, and the clean facts its rules use."""
    if isinstance(layer, str):
        layer = int(layer.split(".")[1])
    prefix = hooks.block_hook(layer, "mlp")
    act_hook = f"{prefix}.hook_mid" if f"{prefix}.hook_mid" in clean.order else f"{prefix}.hook_post"
    gated = model.cfg.gated_mlp and act_hook.endswith("hook_post")
    up = clean[f"{prefix}.hook_pre_linear"] if gated else None
    facts = rules.neuron_facts(act_fn(model, prefix), clean[f"{prefix}.hook_pre"], clean[act_hook], up)
    return MLPSite(prefix, act_hook, facts, layer)


@dataclass(frozen=True)
class Plan:
    """Everything a folded forward needs to know about the model and the components, computed
    once."""

    groups: "list[Group]"  # the same number of components each, all in every forward
    start: str  # the first hook where components enter; DePass replays everything after it
    norms: list[str]  # norm modules after the entry (their outputs are corrected)
    attn: list[str]  # attention modules after the entry ("blocks.0.attn")
    mlps: list[MLPSite]
    keep: list[str]  # hooks whose per-component values are returned
    correct: list[str]  # hooks where the probe is subtracted
    # decompose(logits=...): one position per batch row whose logits are computed ([batch]), or
    # None for every position; `logits=False`: no position reaches the unembedding.
    logit_positions: Tensor | None = None
    logits: bool = True
    # HookedTransformer: the forward starts at this block (`start_at_layer`) from the clean
    # residual, the components entering in it or later; 0: from the tokens.
    start_layer: int = 0
    # Groups entering at the output of MLP `through.layer` = L (`mlp_output_entry`): the forward
    # starts at block L + 1 (`start_layer`) from each slot's resid_post at L, which
    # `through.after_mlp` builds from `block` (this plan's groups through block L,
    # run for the rest, probe and bias alone) and the components' rows at the MLP's activation.
    through: MLPSite | None = None
    block: "Plan | None" = None

    @property
    def total(self) -> int:
        """Components per group, without the group's bias."""
        return len(self.groups[0].labels) - 1

    def window(self, start: int) -> "Plan":
        """The plan at positions `start` onwards (`CleanRun.window`): the MLPs' clean facts and
        the logit positions shifted."""
        if not start:
            return self
        mlps = [dataclasses.replace(s, facts=rules.NeuronFacts(
            *(t[:, start:] for t in (s.facts.act, s.facts.extra, s.facts.ratio)))) for s in self.mlps]
        pos = None if self.logit_positions is None else self.logit_positions - start
        block = None if self.block is None else self.block.window(start)
        return dataclasses.replace(self, mlps=mlps, logit_positions=pos, block=block)


def make_plan(model: Model, clean: CleanRun, groups: "list[Group]", keep: list[str] | Callable,
              logit_pos: Tensor | None = None, logits: bool = True) -> Plan:
    entries = [e.hook for g in groups for e in g.entries]
    entry = min(entries, key=clean.order.index)
    after = clean.after(entry)
    fired = set(clean.order)
    if callable(keep):
        keep = [n for n in [entry, *after]
                if keep(n) and not n.endswith(NOT_DECOMPOSABLE) and n != "unembed.hook_out"]
    for name in keep:
        if name not in fired:
            raise DepassError(f"hook {name} never fires in this model's forward: nothing to keep")
        if name != entry and name not in after:
            raise DepassError(f"hook {name} comes before the components enter at {entry}")
    mlps = [mlp_site(model, clean, int(m.group(1))) for m in map(MLP_PRE.fullmatch, after) if m]
    handled = {s.act_hook for s in mlps} | {
        n for n in after if n.endswith(("attn.hook_v", "attn.hook_z", "mlp.hook_pre"))}
    kept = keep + (["unembed.hook_out"] if logits else [])
    return Plan(
        groups=groups,
        start=entry,
        norms=list(dict.fromkeys(n[: -len(".hook_scale")] for n in after if n.endswith("hook_scale"))),
        attn=[n[: -len(".hook_z")] for n in after if n.endswith("attn.hook_z")],
        mlps=mlps,
        keep=kept,
        # The probe is exactly zero on the residual stream (a sum of corrected outputs).
        correct=[n for n in dict.fromkeys([*after, *kept]) if n not in handled and n != entry
                 and (n.endswith(BIASED) or (n in kept and not RESIDUAL.match(n)))],
        logit_positions=logit_pos,
        logits=logits,
    )


def by_entry_layer(model: Model, clean: CleanRun, plan: Plan) -> list[tuple[list[int], Plan]]:
    """The groups of `plan` split by the block where each first enters, with a plan for each part
    that starts there (HookedTransformer `start_at_layer`): a group entering at layer L never runs
    blocks 0..L-1, whose values its entry overwrites (kept values before the entry are filled from
    the clean run by `decompose`). One part, `plan` itself, where this does not apply (a Bridge,
    shortformer positions, entries outside the blocks)."""
    def layer(group) -> int | None:
        first = min((e.hook for e in group.entries), key=clean.order.index)
        match = BLOCK.match(first)
        return None if match is None else int(match.group(1))

    layers = [layer(g) for g in plan.groups]
    if ((is_bridge(model) and not fast_bridge.can_start(model))  # a Bridge: fast_bridge.starting_at
            or model.cfg.positional_embedding_type == "shortformer" or None in layers):
        return [(list(range(len(plan.groups))), plan)]
    parts = []
    for start in sorted(set(layers)):
        ids = [i for i, x in enumerate(layers) if x == start]
        groups = [plan.groups[i] for i in ids]
        site = mlp_output_entry(model, clean, groups)
        if set(layers) == {0} and site is None:
            return [(ids, plan)]
        entry = min((e.hook for g in groups for e in g.entries), key=clean.order.index)
        keep = [n for n in plan.keep if n != "unembed.hook_out"
                and clean.order.index(n) >= clean.order.index(entry)]
        sub = dataclasses.replace(make_plan(model, clean, groups, keep, plan.logit_positions,
                                            plan.logits), start_layer=start)
        parts.append((ids, sub if site is None else after_mlp(model, clean, sub, site)))
    return parts


def mlp_output_entry(model: Model, clean: CleanRun, groups: "list[Group]") -> MLPSite | None:
    """The MLP of block L where every group enters, when each has just its rest at resid_pre L
    (`Entry.rest`) and its components at the MLP's activation (`Neurons`, `MLPByPosition`):
    the components are exactly zero through block L's attention and MLP input, so they need
    only the MLP's output half. None where this does not apply: a block other than
    TransformerLens's sequential or parallel one (norms after the MLP), an MLP other than the
    plain or gated one, or a hook anywhere in block L; on a Bridge, where
    `bridge_mlp.output_half` says no."""
    layers = set()
    for group in groups:
        rest = [e for e in group.entries if e.rest]
        other = [e for e in group.entries if not e.rest]
        match = MLP_POST.fullmatch(other[0].hook) if len(rest) == len(other) == 1 else None
        if match is None or rest[0].hook != hooks.resid_pre(int(match.group(1))):
            return None
        layers.add(int(match.group(1)))
    if len(layers) != 1:
        return None
    layer = layers.pop()
    names = [n for n in clean.order if n.startswith(f"blocks.{layer}.")]
    if not all(n in names for n in before_mlp(clean, layer)):
        return None
    if is_bridge(model):
        return mlp_site(model, clean, layer) if bridge_mlp.output_half(model, layer, names) else None
    from transformer_lens.components.mlps.gated_mlp import GatedMLP
    from transformer_lens.components.mlps.mlp import MLP

    block, act = model.blocks[layer], f"blocks.{layer}.mlp.hook_post"
    if (act not in names
            or names[names.index(act):] != [act, hooks.block_hook(layer, "hook_mlp_out"),
                                            hooks.block_hook(layer, "hook_resid_post")]
            or type(block.mlp) not in (MLP, GatedMLP) or block.mlp.cfg.is_layer_norm_activation()
            or any(m._forward_hooks or m._forward_pre_hooks for m in block.modules())):
        return None
    return mlp_site(model, clean, layer)


def before_mlp(clean: CleanRun, layer: int) -> list[str]:
    """What block `layer` adds its MLP's output to: resid_mid (sequential blocks), or resid_pre
    and the attention's output (parallel blocks, which have no resid_mid)."""
    mid = hooks.block_hook(layer, "hook_resid_mid")
    if mid in clean.order:
        return [mid]
    return [hooks.block_hook(layer, "hook_resid_pre"), hooks.block_hook(layer, "hook_attn_out")]


def after_mlp(model: Model, clean: CleanRun, sub: Plan, site: MLPSite) -> Plan:
    """`sub` (groups entering at block `site.layer` = L) started at block L + 1 from each slot's
    resid_post at L (`Plan.through`); `block` keeps block L's kept values before the MLP's
    activation, and resid_mid, for the rest, probe and bias."""
    prefix, act = f"blocks.{site.layer}.", clean.order.index(site.act_hook)
    inside = [n for n in sub.keep if n.startswith(prefix) and clean.order.index(n) < act]
    block = make_plan(model, clean, sub.groups,
                      list(dict.fromkeys([*inside, *before_mlp(clean, site.layer)])),
                      sub.logit_positions, logits=False)
    return dataclasses.replace(
        sub, start_layer=site.layer + 1, through=site,
        block=dataclasses.replace(block, start_layer=sub.start_layer),
        norms=[n for n in sub.norms if not n.startswith(prefix)],
        attn=[n for n in sub.attn if not n.startswith(prefix)],
        mlps=[s for s in sub.mlps if s.layer > site.layer],
        correct=[n for n in sub.correct if not n.startswith(prefix)])
