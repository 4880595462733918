"""Running a plan in chunks of components: the non-linear MLP rules need statistics over ALL
components at each MLP, which depend on the shares at earlier MLPs, so a chunked run first sweeps
the chunks once per MLP layer (each sweep stops after that layer) and returns the statistics; the
forwards that keep values then use them."""

from collections.abc import Mapping

import torch
from jaxtyping import Int
from torch import Tensor

from tl_depass.engine import rules
from tl_depass.engine.backends import Model
from tl_depass.engine.clean_run import CleanRun
from tl_depass.engine.plan import Plan, by_entry_layer
from tl_depass.engine.replay import FoldedForward, RuleSetup

Chunks = list[tuple[int, int]]  # (offset, k): components offset .. offset+k of each group


def chunks_of(plan: Plan, chunk_size: int | None) -> Chunks:
    """All groups ride in every forward; `chunk_size` bounds the components per forward."""
    total, n = plan.total, len(plan.groups)
    per_group = max(1, (chunk_size or total * n) // n)
    return [(off, min(per_group, total - off)) for off in range(0, total, per_group)]


def statistics(model: Model, tokens: Int[Tensor, "batch pos"], mask: Tensor | None,
               clean: CleanRun, plan: Plan, setup: RuleSetup, chunks: Chunks
               ) -> dict[str, rules.Stats]:
    """The rule's statistics over all components at each MLP after the entry, by MLP prefix
    (none for the linear rule, or when one forward holds every component)."""
    stats: dict[str, rules.Stats] = {}
    if len(chunks) == 1 or setup.rule == "ratio":
        return stats
    for site in plan.mlps:
        acc = None
        for offset, k in chunks:
            forward = FoldedForward(model, clean, plan, setup, offset, k, stats)
            acc = rules.combine(setup.rule, acc, forward.statistics(site, tokens, mask))
        stats = {**stats, site.prefix: acc}
    return stats


def run_chunks(model: Model, tokens: Int[Tensor, "batch pos"], mask: Tensor | None,
               clean: CleanRun, plan: Plan, setup: RuleSetup, chunk_size: int | None
               ) -> dict[str, Tensor]:
    """Every kept value, [group*(components+1), batch, ...] by hook (each group's bias last).
    Groups run from the block where they enter (`by_entry_layer`); a kept hook before a part's
    entry is left zero for that part's groups (`decompose` fills it from the clean run)."""
    total, out = plan.total, {}
    with torch.no_grad():
        for ids, part in by_entry_layer(model, clean, plan):
            chunks = chunks_of(part, chunk_size)
            stats: Mapping[str, rules.Stats] = statistics(model, tokens, mask, clean, part, setup, chunks)
            for offset, k in chunks:
                kept = FoldedForward(model, clean, part, setup, offset, k, stats).kept(tokens, mask)
                for name, value in kept.items():  # [group, slot, batch, ...]
                    if name not in out:
                        out[name] = value.new_zeros((len(plan.groups), total + 1, *value.shape[2:]))
                    out[name][ids, offset:offset + k] = value[:, :k]
                    out[name][ids, total] = value[:, -1]
        for name in plan.keep:  # kept before every part's entry
            if name not in out:
                out[name] = clean[name].new_zeros((len(plan.groups), total + 1, *clean[name].shape))
    return {name: value.flatten(0, 1) for name, value in out.items()}
