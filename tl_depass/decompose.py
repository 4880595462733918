"""decompose(): clean run -> initial components -> folded, replayed forward(s) -> Decomposition."""

import dataclasses

import torch
from beartype import beartype
from jaxtyping import Int, jaxtyped
from torch import Tensor

from tl_depass import memory
from tl_depass.arguments import Keep, Logits, check_call, logits_all, resolve
from tl_depass.decomposition import Decomposition
from tl_depass.engine import rules
from tl_depass.engine.backends import Model, canonical_names
from tl_depass.engine.clean_run import FROZEN, CleanRun, by_position, head_major, record_clean_run
from tl_depass.engine.guard import check_complete, check_user_hooks, replaced_hooks, serialised
from tl_depass.engine.plan import make_plan
from tl_depass.engine.replay import RuleSetup
from tl_depass.engine.sweep import fastest_chunk, run_chunks
from tl_depass.engine.validate import RESIDUAL, public
from tl_depass.errors import DepassError
from tl_depass.levels.base import Group, Level
from tl_depass.levels.label import Label
from tl_depass.levels.tokens import PosEmbed


def bos_exclusions(model: Model, tokens: Int[Tensor, "batch pos"], mask: Tensor | None,
                   labels: list[Label], rule: rules.Rule, ignore_bos: bool | int) -> Tensor:
    """Which (component, batch, pos) the non-linear rules leave out of MLP shares: a BOS token's
    own component everywhere but at its position (`labels`: one group's, bias included)."""
    batch, n = tokens.shape
    excluded = torch.zeros(len(labels) - 1, batch, n, dtype=torch.bool, device=tokens.device)
    positional = [c for c, label in enumerate(labels[:-1]) if label.kind == "token"]
    if not positional or rule == "ratio" or ignore_bos is False:
        return excluded
    bos = ignore_bos if not isinstance(ignore_bos, bool) else (
        model.tokenizer.bos_token_id if model.tokenizer is not None else None)
    if bos is None:
        return excluded
    first = mask.argmax(1) if mask is not None else torch.zeros(batch, dtype=torch.long)
    for b, f in enumerate(first.tolist()):
        if tokens[b, f] == bos:
            for c in positional:
                if labels[c].index == f:
                    excluded[c, b, :] = True
                    excluded[c, b, f] = False
    return excluded


def check_groups(parts: list[Group], spec: Level) -> list[Label]:
    """The labels of every component (group numbers set); the groups must be alike."""
    if not parts or any(len(g.labels) < 2 or not g.entries for g in parts):
        raise DepassError(f"{type(spec).__name__}.groups gave {len(parts)} groups: a level needs at "
                          "least one group, each with entries and labels (components, then the bias)")
    if len({len(g.labels) for g in parts}) > 1:  # groups ride in one folded forward
        raise DepassError(f"{type(spec).__name__}: its groups have different numbers of components "
                          f"({sorted({len(g.labels) for g in parts})}); decompose them in separate calls")
    return [dataclasses.replace(label, group=g) for g, part in enumerate(parts) for label in part.labels]


@public
@serialised
@jaxtyped(typechecker=beartype)
def decompose(
    model: Model,
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
    logits: Logits = "last",
) -> Decomposition:
    """Split every kept activation and the logits of `model` on `tokens` into exact additive
    shares of `components` (plus a last "bias" component), with attention patterns, norm scales
    and MLP activations frozen at their clean values. See docs/rules.md for the rules.
    Before anything is allocated, the memory the call needs (`estimate_memory`) is checked
    against what is free (or `max_memory` bytes); `chunk_size=None` runs the largest chunk of
    components per forward that fits and, without `max_memory`, whose transient memory stays
    within the results' size or 1/8 of the free memory (one forward unless it is large; the
    softmax and max rules then add a statistics sweep: more time, same results). The token
    level runs on the CPU in chunks of at least 16 positions (up to 8), each skipping the
    positions before its first component: the ratio rule's one after another, the softmax and
    max rules' in lockstep, meeting at each MLP, where one forward would fit.
    `logits`: whose logits are decomposed: "last" (the default since 0.2.0: each row's last
    unpadded token), a position (int) or one per row (tensor [batch]) (`dec.logits`
    [component, batch, d_vocab], positions in `dec.logit_positions`), "all" (`dec.logits`
    [component, batch, pos, d_vocab], the default before 0.2.0), or None (no logits). Only the
    kept positions are unembedded; `dec.clean_logits` stays the full clean logits,
    `dec.clean["logits"]` has `dec.logits`' positions."""
    call = check_call(model, tokens, components, mlp_rule=mlp_rule, temperature=temperature,
                      attention_mask=attention_mask, ignore_bos=ignore_bos, pos_embed=pos_embed,
                      keep=keep, chunk_size=chunk_size, logits=logits)
    tokens, mask, spec, keep_list = call.tokens, call.mask, call.spec, call.keep
    logit_pos, n_logits = call.logit_positions, call.n_logits
    hooks = canonical_names(model)
    *counts, exact = memory.count_components(spec, model, tokens.shape[1])
    chunk = memory.fitted(model, tokens, mask, spec, keep_list, chunk_size, max_memory,
                          tuple(counts), n_logits=n_logits)
    reads = {resolve(hooks, n) for n in spec.reads(model)}
    clean = record_clean_run(
        model, tokens, mask,
        lambda n: n.endswith(FROZEN) or n in reads or RESIDUAL.match(n) is not None
        or (keep_list(n) if callable(keep_list) else n in keep_list),
    )
    parts = spec.groups(model, clean, tokens)
    labels = check_groups(parts, spec)
    plan = make_plan(model, clean, parts, keep_list, logit_pos, logits is not None)
    user = check_user_hooks(model, replaced_hooks(model, plan.attn, plan.mlps))
    if not exact:  # a lower bound was checked; the clean run has fixed the count
        chunk = memory.fitted(model, tokens, mask, spec, keep_list, chunk_size,
                              max_memory, (len(parts), plan.total), n_logits=n_logits)
    together = False
    if chunk_size is None:  # token components run fastest in windows
        chunk, together = fastest_chunk(model, plan, mlp_rule, chunk, tokens.shape[1])
    excluded = bos_exclusions(model, tokens, mask, parts[0].labels, mlp_rule, ignore_bos)
    setup = RuleSetup(mlp_rule, temperature, excluded)
    results = run_chunks(model, tokens, mask, clean, plan, setup, chunk, together=together)
    fill_before_entry(results, clean, parts)
    # A model spread over devices (n_devices, device_map) leaves each value on its layer's
    # device: the result gathers on the tokens' (no copy on one device).
    results = {name: value.to(tokens.device) for name, value in results.items()}
    clean_values = {h: clean[h].to(tokens.device) for h in plan.keep}
    if logits is not None:
        results["logits"] = results.pop("unembed.hook_out")
        clean_values["logits"] = clean_values.pop("unembed.hook_out")
    if logit_pos is not None:  # [component, batch, 1, d_vocab]: never padding (checked)
        results["logits"] = results["logits"].squeeze(2)
        clean_values["logits"] = clean_values["logits"][torch.arange(len(logit_pos)), logit_pos]
    if mask is not None:
        pad = mask == 0
        per_pos = [n for n in results if n != "logits" or logit_pos is None]
        results |= {n: zero_padding(n, results[n], pad, 1) for n in per_pos}
        clean_values |= {n: zero_padding(n, clean_values[n], pad, 0) for n in per_pos}
    option = "all" if logits_all(logits) else None if logits is None else (
        "last" if isinstance(logits, str) else "positions")
    return check_complete(Decomposition(model, labels, results, clean_values, tokens, mask,
                                        clean.logits.to(tokens.device), n_groups=len(parts),
                                        logits=option,
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


def zero_padding(name: str, value: Tensor, pad: Tensor, lead: int) -> Tensor:
    """Zero hook `name`'s `value` ([lead axes..., batch, pos, ...], or a Bridge's query/key norm's
    [..., batch, head, pos, ...]) at padded positions."""
    head = head_major(name, value, *pad.shape, lead)
    x = by_position(value, head, lead)
    x = x.masked_fill(pad.reshape(*[1] * lead, *pad.shape, *[1] * (x.ndim - lead - 2)), 0)
    return by_position(x, head, lead)
