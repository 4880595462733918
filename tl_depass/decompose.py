"""decompose(): clean run -> initial components -> folded, replayed forward(s) -> Decomposition."""

import difflib
from collections.abc import Callable, Sequence

import torch
from beartype import beartype
from jaxtyping import jaxtyped
from torch import Tensor

from tl_depass import backends, memory, rules
from tl_depass.backends import canonical_names, check_model
from tl_depass.clean_run import FROZEN, CleanRun, record_clean_run
from tl_depass.components import Group, PosEmbed, TokensAt, as_components, groups
from tl_depass.decomposition import Decomposition
from tl_depass.errors import DepassError
from tl_depass.guard import check_complete, check_user_hooks, replaced_hooks, serialised
from tl_depass.replay import FoldedForward, Plan, RuleSetup, mlp_site
from tl_depass.support import check_supported
from tl_depass.validate import RESIDUAL, check_options, check_text, public

NOT_DECOMPOSABLE = ("hook_scale", "hook_attn_scores", "hook_pattern", "hook_tokens")
# Hooks right after a bias is added (a Bridge's raw `o.hook_out` / `out.hook_out` fire where an
# adapter that delegates attention to HF has no `hook_attn_out`; correcting twice is a no-op).
BIASED = ("hook_attn_out", "hook_mlp_out", "unembed.hook_out", "attn.o.hook_out", "mlp.out.hook_out")
Keep = str | Sequence[str] | Callable[[str], bool] | None
Logits = str | int | Tensor | None


def prepare_tokens(model, tokens, attention_mask) -> tuple[Tensor, Tensor | None]:
    if isinstance(tokens, list) and not all(isinstance(t, str) for t in tokens):
        raise DepassError(f"tokens is a list of {sorted({type(t).__name__ for t in tokens})}: pass "
                          "token ids as an integer tensor [batch, pos] (torch.tensor(ids)), or text")
    if isinstance(tokens, (str, list)):
        if model.tokenizer is None:
            raise DepassError("string input needs a tokenizer; pass token ids [batch, pos]")
        check_text(model, tokens)
        tokens = model.to_tokens(tokens)
        if attention_mask is None and tokens.shape[0] > 1:
            attention_mask = backends.attention_mask(model, tokens)
    if (not isinstance(tokens, Tensor) or tokens.is_floating_point() or tokens.is_complex()
            or tokens.dtype == torch.bool):
        raise DepassError(
            f"tokens must be an integer tensor [batch, pos] (or a string); got "
            f"{getattr(tokens, 'dtype', type(tokens).__name__)}: use model.to_tokens(text)"
        )
    if tokens.ndim == 1:
        tokens = tokens[None]
    if tokens.ndim != 2 or 0 in tokens.shape:
        raise DepassError(f"tokens must have shape [batch, pos] with batch, pos >= 1; got "
                          f"{tuple(tokens.shape)}")
    bad = (tokens < 0) | (tokens >= model.cfg.d_vocab)
    if bad.any():
        raise DepassError(
            f"token ids {tokens[bad].unique().tolist()[:5]} are outside the vocabulary "
            f"[0, {model.cfg.d_vocab}) of this model"
        )
    if tokens.shape[1] > model.cfg.n_ctx:
        raise DepassError(
            f"{tokens.shape[1]} positions exceed the model's context n_ctx={model.cfg.n_ctx}: "
            "shorten the prompt"
        )
    tokens = tokens.to(model.cfg.device)
    if attention_mask is not None:
        if not isinstance(attention_mask, Tensor):
            raise DepassError(f"attention_mask must be a tensor [batch, pos] of 0/1, got "
                              f"{type(attention_mask).__name__}")
        if tuple(attention_mask.shape) != tuple(tokens.shape):
            raise DepassError(
                f"attention_mask has shape {tuple(attention_mask.shape)} but tokens have "
                f"{tuple(tokens.shape)}: pass one 0/1 entry per token"
            )
        if not ((attention_mask == 0) | (attention_mask == 1)).all():
            raise DepassError("attention_mask must hold only 0 (padding) and 1 (token)")
        if (attention_mask.sum(1) == 0).any():
            raise DepassError("attention_mask has a row with no tokens")
        attention_mask = attention_mask.to(model.cfg.device).long()
    return tokens, attention_mask


def keep_names(hooks: dict[str, str], keep: Keep) -> list[str] | Callable[[str], bool]:
    """Explicit hook names to keep (checked now, aliases resolved), or a filter applied to the
    hooks DePass decomposes (those after the entry point)."""
    if keep is None:
        return lambda name: RESIDUAL.match(name) is not None
    if callable(keep) and not isinstance(keep, str):
        return keep
    names = [keep] if isinstance(keep, str) else list(keep)
    names = [n if n == "logits" else resolve(hooks, n) for n in names]
    for name in names:
        if name.endswith(NOT_DECOMPOSABLE):
            raise DepassError(
                f"{name} is not a sum of component shares (DePass freezes it); keep residual, "
                "attention or MLP activations instead"
            )
    return [n for n in names if n != "logits"]


def resolve(hooks: dict[str, str], name: str) -> str:
    """The canonical name of hook `name` in `hooks` (backends.canonical_names: a Bridge alias or
    raw name maps to the HookedTransformer name of the same hook point)."""
    if name not in hooks:
        close = difflib.get_close_matches(name, list(hooks), n=3)
        raise DepassError(f"unknown hook name {name!r}; did you mean {close}?")
    return hooks[name]


def logit_positions(tokens: Tensor, mask: Tensor | None, logits: object) -> Tensor | None:
    """decompose's `logits=`: the kept position of each batch row ([batch]), or None ("all" and
    None: every position or none, which the caller tells apart)."""
    batch, n = tokens.shape
    if logits is None or isinstance(logits, str) and logits == "all":
        return None
    if isinstance(logits, str):
        if logits != "last":
            raise DepassError(f"unknown logits={logits!r}; use 'all', 'last', None, a position "
                              "(int) or one position per batch row (an integer tensor [batch])")
        if mask is None:
            return torch.full((batch,), n - 1, dtype=torch.long, device=tokens.device)
        return n - 1 - mask.flip(1).argmax(1)  # each row's last real token (any padding side)
    if isinstance(logits, bool) or not isinstance(logits, (int, Tensor)):
        raise DepassError(f"logits must be 'all', 'last', None, an int or an integer tensor "
                          f"[batch]; got {type(logits).__name__}")
    if isinstance(logits, Tensor) and (
            logits.is_floating_point() or logits.is_complex() or logits.dtype == torch.bool
            or tuple(logits.shape) != (batch,)):
        raise DepassError(f"logits= as a tensor must hold one integer position per batch row, "
                          f"shape [{batch}]; got {logits.dtype} of shape {tuple(logits.shape)}")
    pos = torch.as_tensor(logits, device=tokens.device).long().reshape(-1).expand(batch)
    if ((pos < -n) | (pos >= n)).any():
        raise DepassError(f"logits= position {pos.tolist()} out of range for {n} positions: pass "
                          f"positions in -{n}..{n - 1}")
    pos = pos % n
    if mask is not None and (mask[torch.arange(batch), pos] == 0).any():
        rows = torch.nonzero(mask[torch.arange(batch), pos] == 0).flatten().tolist()
        raise DepassError(f"logits= position {pos.tolist()} is padding in batch rows {rows}: pass "
                          "logits='last' (each row's last token) or one position per row")
    return pos.clone()


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
    check_model(model)
    check_supported(model.cfg)
    check_options(model, mlp_rule, temperature, chunk_size, ignore_bos)
    tokens, mask = prepare_tokens(model, tokens, attention_mask)
    logit_pos = logit_positions(tokens, mask, logits)
    n_logits = tokens.shape[1] if logits_all(logits) else int(logits is not None)
    spec = check_pos_embed(as_components(components, model), pos_embed)
    hooks = canonical_names(model)
    entry = getattr(spec, "hook", None)  # None: the level knows its entry points (canonical)
    keep_list = keep_names(hooks, keep)
    exact = memory.count_components(spec, model, tokens.shape[1], pos_embed)[2]
    chunk = memory.fitted(model, tokens, mask, spec, keep_list, pos_embed, chunk_size, max_memory,
                          n_logits=n_logits)
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


def logits_all(logits: object) -> bool:
    return isinstance(logits, str) and logits == "all"


def check_pos_embed(spec, pos_embed: PosEmbed):
    if pos_embed == "separate" and spec != TokensAt(0):
        raise DepassError(f"pos_embed='separate' splits the token level (TokensAt(0)) only, not "
                          f"{type(spec).__name__}: leave pos_embed='with_token'")
    return spec


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
