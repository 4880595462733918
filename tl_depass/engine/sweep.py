"""Running a plan in chunks of components: the non-linear MLP rules need statistics over ALL
components at each MLP, which depend on the shares at earlier MLPs, so a chunked run first sweeps
the chunks once per MLP layer (each sweep stops after that layer) and returns the statistics; the
forwards that keep values then use them. Or the chunks run in lockstep, meeting at each MLP
(engine/together.py): the token level's default for those rules."""

import weakref
from collections.abc import Callable, Mapping

import torch
from jaxtyping import Int
from torch import Tensor

from tl_depass.engine import rules
from tl_depass.engine.backends import Model
from tl_depass.engine.clean_run import QK_NORMS, CleanRun
from tl_depass.engine.plan import Plan, by_entry_layer
from tl_depass.engine.replay import FoldedForward, RuleSetup
from tl_depass.engine.together import lockstep, run_together

Chunks = list[tuple[int, int]]  # (offset, k): components offset .. offset+k of each group


def chunks_of(plan: Plan, chunk_size: int | None) -> Chunks:
    """All groups ride in every forward; `chunk_size` bounds the components per forward."""
    total, n = plan.total, len(plan.groups)
    per_group = max(1, (chunk_size or total * n) // n)
    return [(off, min(per_group, total - off)) for off in range(0, total, per_group)]


def window(model: Model, plan: Plan, offset: int, k: int) -> int:
    """The position before which components `offset .. offset+k` of every group are exactly zero
    (`Entry.first`; 0 where an entry does not say, or the model is not causal), no later than a
    kept logit position. HookedTransformer and TransformerBridge alike, but not where a query/key
    norm's value is kept: `run_chunks` writes positions on the axis after the batch."""
    entries = [e for g in plan.groups for e in g.entries]
    if (model.cfg.attention_dir != "causal" or any(e.first is None for e in entries)
            or any(q in n for n in plan.keep for q in QK_NORMS)):
        return 0
    start = min(e.first(offset, k) for e in entries)
    if start and plan.logit_positions is not None:
        start = min(start, int(plan.logit_positions.min()))
    return start


#: The token level's default chunks (`fastest_chunk`): at least this many positions each, at most
#: MAX_WINDOWS of them (measured fastest on CPU; docs/benchmarks.md "Windows").
WINDOW_POSITIONS, MAX_WINDOWS = 16, 8


def fastest_chunk(model: Model, plan: Plan, rule: rules.Rule, chunk: int | None, pos: int
                  ) -> tuple[int | None, bool]:
    """The chunk size and whether the chunks run in lockstep (engine/together.py): `chunk` (the
    largest that fits; None: all in one forward), or a smaller one where that is faster. Chunks
    of token components skip the positions before their first (`window`), so c chunks do about
    (1 + 1/c)/2 of one forward's work, against a fixed cost per forward: the linear rule runs
    them one after another, the softmax/max rules in lockstep (no statistics sweep), where one
    forward would fit. Not on a GPU, where the fixed cost wins (an H200, docs/benchmarks.md
    "GPU (H200)": the ratio rule in 2-8 windows cost 1.4-2.1x the softmax rule's one forward)."""
    c = min(MAX_WINDOWS, pos // WINDOW_POSITIONS)
    on_cpu = next(model.parameters()).device.type == "cpu"
    if c < 2 or len(plan.groups) > 1 or not on_cpu or not window(model, plan, 1, 1):
        return chunk, False
    size = -(-plan.total // c)
    if rule == "ratio":
        return (size if chunk is None else min(chunk, size)), False
    return (size, True) if chunk is None and lockstep(model, plan, rule) else (chunk, False)


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
            forward = FoldedForward(model, clean, plan, setup, offset, k, stats,
                                    window(model, plan, offset, k))
            acc = rules.combine(setup.rule, acc, forward.statistics(site, tokens, mask))
        stats = {**stats, site.prefix: acc}
    return stats


def run_chunks(model: Model, tokens: Int[Tensor, "batch pos"], mask: Tensor | None,
               clean: CleanRun, plan: Plan, setup: RuleSetup, chunk_size: int | None,
               together: bool = False) -> dict[str, Tensor]:
    """Every kept value, [group*(components+1), batch, ...] by hook (each group's bias last).
    Groups run from the block where they enter (`by_entry_layer`); a kept hook before a part's
    entry is left unset for that part's groups (`decompose.fill_before_entry` writes all of it).
    With one part, hooks whose values a forward keeps as one tensor (a HookedTransformer's
    `blocks.L.hook_resid_post` and `blocks.{L+1}.hook_resid_pre`) share one result tensor.
    `together`: the chunks of a part run in lockstep (engine/together.py) where they can, instead
    of one after another after a statistics sweep."""
    total, out = plan.total, {}
    with torch.no_grad():
        parts = by_entry_layer(model, clean, plan)
        if len(parts) == 1 and len(chunks_of(plan, chunk_size)) == 1:
            kept = FoldedForward(model, clean, parts[0][1], setup, 0, total, {}).kept(tokens, mask)
            return keep_zeros(own_results(kept), clean, plan)
        for ids, part in parts:
            if ids == list(range(ids[0], ids[-1] + 1)):  # a slice: no index copied to the device
                ids = slice(ids[0], ids[-1] + 1)
            writer = Results(out, ids, part, len(plan.groups), share=len(parts) == 1)
            chunks = chunks_of(part, chunk_size)
            if together and len(chunks) > 1 and lockstep(model, part, setup.rule):
                run_together(model, tokens, mask, [
                    FoldedForward(model, clean, part, setup, offset, k, {}, window(model, part, offset, k))
                    for offset, k in chunks], writer.chunk)
                continue
            stats: Mapping[str, rules.Stats] = statistics(model, tokens, mask, clean, part, setup, chunks)
            for offset, k in chunks:
                forward = FoldedForward(model, clean, part, setup, offset, k, stats,
                                        window(model, part, offset, k))
                sink = writer.chunk(forward)
                for name, value in forward.kept(tokens, mask).items():
                    sink(name, value)
    return keep_zeros({name: value.flatten(0, 1) for name, value in out.items()}, clean, plan)


class Results:
    """Where the chunks of one part (`ids`: its groups) write their kept values: `out[name]`,
    [group, total + 1, batch, ...], each chunk's components at its offset (zero before its
    window), the bias slot from the chunk at offset 0 (window 0: the bias needs every position).
    `share`: hooks that a chunk keeps as one tensor share one result tensor."""

    def __init__(self, out: dict[str, Tensor], ids, part: Plan, groups: int, share: bool):
        self.out, self.ids, self.part, self.groups, self.share = out, ids, part, groups, share

    def chunk(self, forward: FoldedForward) -> Callable[[str, Tensor], None]:
        """Writes one kept value of `forward`, [group, slot, batch, pos from its window, ...]."""
        out, ids, part, total = self.out, self.ids, self.part, self.part.total
        offset, k, start = forward.offset, forward.k, forward.window
        first: dict[tuple, tuple[weakref.ref, str]] = {}  # the first hook keeping each live tensor

        def write(name: str, value: Tensor) -> None:
            per_pos = name != "unembed.hook_out" or part.logit_positions is None
            alias, key = name, view_key(value)
            if self.share and key in first and first[key][0]() is not None:  # the same live
                alias = first[key][1]  # tensor as an earlier hook's: the same result
            elif self.share:
                first[key] = (weakref.ref(value if value._base is None else value._base), name)
            if name not in out and alias != name:
                out[name] = out[alias]
            elif name not in out:  # unset before a part's entry: see `run_chunks`
                shape = list(value.shape[2:])
                shape[1] += start if per_pos else 0
                out[name] = value.new_empty((self.groups, total + 1, *shape))
            if per_pos and start:  # components exactly zero before their window
                out[name][ids, offset:offset + k, :, :start] = 0
            out[name][ids, offset:offset + k, :, start if per_pos else 0:] = value[:, :k]
            if offset == 0:  # the bias slot needs every position: window 0 here
                out[name][ids, total] = value[:, -1]
        return write


def keep_zeros(out: dict[str, Tensor], clean: CleanRun, plan: Plan) -> dict[str, Tensor]:
    """`out` with zeros for the kept hooks before every part's entry."""
    rows = len(plan.groups) * (plan.total + 1)
    return out | {name: clean[name].new_zeros((rows, *clean[name].shape))
                  for name in plan.keep if name not in out}


def view_key(value: Tensor) -> tuple:
    """Equal for two views of the same values."""
    return (value.untyped_storage().data_ptr(), value.storage_offset(), value.stride(), value.shape)


def own_results(kept: dict[str, Tensor]) -> dict[str, Tensor]:
    """One forward's kept values ([group, slot, batch, ...]) as the results, without a copy
    (`without_probes`); hooks that kept the same tensor share the result. A tensor that only
    overlaps another hook's is copied first, so that no move corrupts the other."""
    views: dict[int, set] = {}
    for value in kept.values():
        views.setdefault(value.untyped_storage().data_ptr(), set()).add(view_key(value))
    done: dict[tuple, Tensor] = {}
    out = {}
    for name, value in kept.items():
        key = view_key(value)
        if key not in done:
            if len(views[key[0]]) > 1 or not value.is_contiguous():
                value = value.clone(memory_format=torch.contiguous_format)
            done[key] = without_probes(value)
        out[name] = done[key]
    return out


def without_probes(value: Tensor) -> Tensor:
    """[group, k + 2, batch, ...] (each group's components, probe, bias) as [group * (k + 1),
    batch, ...] (components, bias) in place: every row moves down over the probes (in pieces no
    longer than the distance moved, so no piece overlaps its source) and the result is a view of
    the first rows. Contiguous `value` only."""
    groups, width = value.shape[:2]
    k = width - 2
    flat = value.flatten(0, 1)  # a view: the slot axes of one folded batch axis
    for g in range(groups):
        for dest, src, n in ((g * (k + 1), g * width, k), (g * (k + 1) + k, g * width + k + 1, 1)):
            step = src - dest
            for i in range(0, n if step else 0, step or 1):
                m = min(step, n - i)
                flat[dest + i:dest + i + m] = flat[src + i:src + i + m]
    return flat[:groups * (k + 1)]
