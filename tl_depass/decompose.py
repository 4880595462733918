"""decompose(): clean run -> initial components -> folded, replayed forward(s) -> Decomposition."""

from collections.abc import Callable

import torch
from beartype import beartype
from jaxtyping import jaxtyped
from torch import Tensor

from tl_depass import memory
from tl_depass.decomposition import Decomposition
from tl_depass.engine import rules
from tl_depass.engine.arguments import Keep, Logits, check_call, logits_all, resolve
from tl_depass.engine.backends import canonical_names
from tl_depass.engine.clean_run import FROZEN, CleanRun, record_clean_run
from tl_depass.engine.guard import check_complete, check_user_hooks, replaced_hooks, serialised
from tl_depass.engine.replay import FoldedForward, Plan, RuleSetup, mlp_site
from tl_depass.engine.validate import NOT_DECOMPOSABLE, RESIDUAL, public
from tl_depass.errors import DepassError
from tl_depass.levels.components import Group, PosEmbed, TokensAt, groups

# Hooks right after a bias is added (a Bridge's raw `o.hook_out` / `out.hook_out` fire where an
# adapter that delegates attention to HF has no `hook_attn_out`; correcting twice is a no-op).
BIASED = ("hook_attn_out", "hook_mlp_out", "unembed.hook_out", "attn.o.hook_out", "mlp.out.hook_out")


def make_plan(model, clean: CleanRun, entries: list[str], keep: list[str] | Callable,
              logit_pos: Tensor | None = None, logits: bool = True) -> Plan:
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
    mlps = [mlp_site(model, clean, n[: -len(".hook_pre")]) for n in after
            if n.endswith("mlp.hook_pre")]
    handled = {s.act_hook for s in mlps} | {
        n for n in after if n.endswith(("attn.hook_v", "attn.hook_z", "mlp.hook_pre"))}
    kept = keep + (["unembed.hook_out"] if logits else [])
    return Plan(
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


def bos_exclusions(model, tokens, mask, n_components: int, positional: bool,
                   rule: rules.Rule, ignore_bos: bool | int) -> Tensor:
    batch, n = tokens.shape
    excluded = torch.zeros(n_components, batch, n, dtype=torch.bool, device=tokens.device)
    if not positional or rule == "ratio" or ignore_bos is False:
        return excluded
    bos = ignore_bos if not isinstance(ignore_bos, bool) else (
        model.tokenizer.bos_token_id if model.tokenizer is not None else None)
    if bos is None:
        return excluded
    first = mask.argmax(1) if mask is not None else torch.zeros(batch, dtype=torch.long)
    for b, f in enumerate(first.tolist()):
        if tokens[b, f] == bos:
            excluded[f, b, :] = True
            excluded[f, b, f] = False
    return excluded


@public
@serialised
@jaxtyped(typechecker=beartype)
def decompose(
    model,
    tokens: Tensor | str | list[str],  # Int[batch pos]; checked below with messages that say
    components: object = "tokens",  # how to fix the input, not just the expected type
    *,
    mlp_rule: rules.Rule | str = "softmax",
    temperature: float = 0.1,
    attention_mask: Tensor | None = None,
    ignore_bos: bool | int = True,
    pos_embed: PosEmbed = "with_token",
    keep: Keep = None,
    chunk_size: int | None = None,
    max_memory: int | None = None,
    logits: Logits = "all",
) -> Decomposition:
    """Split every kept activation and the logits of `model` on `tokens` into exact additive
    shares of `components` (plus a last "bias" component), with attention patterns, norm scales
    and MLP activations frozen at their clean values. See docs/rules.md for the rules.
    Before anything is allocated, the memory the call needs (`estimate_memory`) is checked
    against what is free (or `max_memory` bytes); `chunk_size=None` runs the largest chunk of
    components per forward that fits.
    `logits`: whose logits are decomposed: "all" (`dec.logits` [component, batch, pos, d_vocab]),
    "last" (each row's last unpadded token), a position (int) or one per row (tensor [batch])
    (`dec.logits` [component, batch, d_vocab], positions in `dec.logit_positions`), or None (no
    logits). Only the kept positions are unembedded; `dec.clean_logits` stays the full clean
    logits, `dec.clean["logits"]` has `dec.logits`' positions."""
    call = check_call(model, tokens, components, mlp_rule=mlp_rule, temperature=temperature,
                      attention_mask=attention_mask, ignore_bos=ignore_bos, pos_embed=pos_embed,
                      keep=keep, chunk_size=chunk_size, logits=logits)
    tokens, mask, spec, keep_list = call.tokens, call.mask, call.spec, call.keep
    logit_pos, n_logits = call.logit_positions, call.n_logits
    hooks = canonical_names(model)
    entry = getattr(spec, "hook", None)  # None: the level knows its entry points (canonical)
    *counts, exact = memory.count_components(spec, model, tokens.shape[1], pos_embed)
    chunk = memory.fitted(model, tokens, mask, spec, keep_list, pos_embed, chunk_size, max_memory,
                          tuple(counts), n_logits=n_logits)
    reads = {resolve(hooks, n) for n in getattr(spec, "reads", lambda model: [])(model)}
    clean = record_clean_run(
        model, tokens, mask,
        lambda n: n.endswith(FROZEN) or n == entry or n in reads or RESIDUAL.match(n) is not None
        or (keep_list(n) if callable(keep_list) else n in keep_list),
    )
    parts = groups(spec, model, clean, tokens, pos_embed)
    plan = make_plan(model, clean, [e.hook for g in parts for e in g.entries], keep_list,
                     logit_pos, logits is not None)
    user = check_user_hooks(model, replaced_hooks(model, plan.attn, plan.mlps))
    n_components = len(parts[0].labels) - 1
    if not exact:  # a lower bound was checked; the clean run has fixed the count
        chunk = memory.fitted(model, tokens, mask, spec, keep_list, pos_embed, chunk_size,
                              max_memory, (len(parts), n_components), n_logits=n_logits)
    excluded = bos_exclusions(model, tokens, mask, n_components, isinstance(spec, TokensAt),
                              mlp_rule, ignore_bos)
    setup = RuleSetup(mlp_rule, temperature, excluded)
    results = run_chunks(model, tokens, mask, clean, plan, setup, parts, chunk)
    fill_before_entry(results, clean, parts)
    labels = [label for g in parts for label in g.labels]
    clean_values = {h: clean[h] for h in plan.keep}
    if logits is not None:
        results["logits"] = results.pop("unembed.hook_out")
        clean_values["logits"] = clean_values.pop("unembed.hook_out")
    if logit_pos is not None:  # [component, batch, 1, d_vocab]: never padding (checked)
        results["logits"] = results["logits"].squeeze(2)
        clean_values["logits"] = clean_values["logits"][torch.arange(len(logit_pos)), logit_pos]
    if mask is not None:
        pad = mask == 0
        per_pos = [n for n in results if n != "logits" or logit_pos is None]
        results |= {n: zero_padding(results[n], pad, 1) for n in per_pos}
        clean_values |= {n: zero_padding(clean_values[n], pad, 0) for n in per_pos}
    option = "all" if logits_all(logits) else None if logits is None else (
        "last" if isinstance(logits, str) else "positions")
    return check_complete(Decomposition(model, labels, results, clean_values, tokens, mask,
                                        clean.logits, n_groups=len(parts), logits=option,
                                        logit_positions=logit_pos), user)


def fill_before_entry(results: dict[str, Tensor], clean: CleanRun, parts: list[Group]) -> None:
    """At hooks before a group enters (earlier layers, for Heads), its first component ("rest")
    carries the whole clean activation and the others nothing."""
    size = len(parts[0].labels)
    for g, part in enumerate(parts):
        first = min(clean.order.index(e.hook) for e in part.entries)
        for name, value in results.items():
            if name in clean.order and clean.order.index(name) < first:
                value[g * size:(g + 1) * size] = 0
                value[g * size] = clean[name]


def zero_padding(value: Tensor, pad: Tensor, lead: int) -> Tensor:
    """Zero `value` ([lead axes..., batch, pos, ...]) at padded positions."""
    return value.masked_fill(pad.reshape(*[1] * lead, *pad.shape, *[1] * (value.ndim - lead - 2)), 0)


def run_chunks(model, tokens, mask, clean, plan, setup, parts: list[Group],
               chunk_size: int | None) -> dict[str, Tensor]:
    """All groups ride in every forward; `chunk_size` bounds the components per forward."""
    total = len(parts[0].labels) - 1
    per_group = max(1, (chunk_size or total * len(parts)) // len(parts))
    chunks = [(off, min(per_group, total - off)) for off in range(0, total, per_group)]

    def forward(offset, k):
        f = FoldedForward(model, clean, plan, setup, parts, offset, k, total)
        f.run(tokens, mask)
        return f

    with torch.no_grad():
        if len(chunks) > 1 and setup.rule != "ratio":
            # Non-linear rules need statistics over ALL components at each MLP, which depend on
            # the shares at earlier MLPs: one sweep per MLP layer, each stopping at that layer.
            for site in plan.mlps:
                setup.collect, acc = site.prefix, None
                for offset, k in chunks:
                    acc = rules.combine(setup.rule, acc, forward(offset, k).partial)
                setup.stats[site.prefix] = acc
            setup.collect = None
        out: dict[str, Tensor] = {}
        for offset, k in chunks:
            for name, value in forward(offset, k).kept.items():  # [group, slot, batch, ...]
                if name not in out:
                    out[name] = value.new_empty((len(parts), total + 1, *value.shape[2:]))
                out[name][:, offset:offset + k] = value[:, :k]
                out[name][:, total] = value[:, -1]
    return {name: value.flatten(0, 1) for name, value in out.items()}
