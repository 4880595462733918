"""decompose's arguments, checked once: by `decompose`, `attribute`, `compare` and
`estimate_memory` alike (token ids and their mask, the component spec, the hooks to keep, the
positions whose logits are kept)."""

import difflib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Integer, Shaped
from torch import Tensor

from tl_depass.engine import backends
from tl_depass.engine.backends import Model, canonical_names, check_model
from tl_depass.engine.support import check_supported
from tl_depass.engine.validate import NOT_DECOMPOSABLE, RESIDUAL, check_options, check_text
from tl_depass.errors import DepassError
from tl_depass.levels.components import as_components
from tl_depass.levels.tokens import PosEmbed, TokensAndPosition, TokensAt

Keep = str | Sequence[str] | Callable[[str], bool] | None
Logits = str | int | Tensor | None
#: What the public functions take as token input: ids [batch, pos] (or one row [pos]), or text.
Tokens = Integer[Tensor, "batch pos"] | Integer[Tensor, " pos"] | str | list[str]
#: A padding mask: 0 (padding) / 1 (token) per token of `tokens` (any dtype holding 0/1).
Mask = Shaped[Tensor, "batch pos"] | None
#: The position read in each batch row: one int, or one per row.
Pos = int | Integer[Tensor, ""] | Integer[Tensor, "#batch"]


@dataclass(frozen=True)
class Checked:
    """A decompose call's arguments after every check."""

    tokens: Tensor  # [batch, pos] on the model's device
    mask: Tensor | None  # [batch, pos] 0/1, or None
    spec: object  # the component spec (a level, TokensAt or Split)
    keep: list[str] | Callable[[str], bool]  # see keep_names
    logit_positions: Tensor | None  # [batch], or None for every position (or none)
    n_logits: int | None  # positions per row whose logits are kept (None: all)


def check_call(model: object, tokens, components: object = "tokens", *, mlp_rule="softmax",
               temperature=0.1, attention_mask=None, ignore_bos=True,
               pos_embed: PosEmbed = "with_token", keep: Keep = None, chunk_size=None,
               logits: object = "last") -> Checked:  # checked by logit_positions
    """Every check decompose makes before it runs the model (DepassError on bad input; `model`
    is `object` because the first check is whether it is a `Model`)."""
    check_model(model)
    check_supported(model.cfg)
    check_options(model, mlp_rule, temperature, chunk_size, ignore_bos)
    tokens, mask = prepare_tokens(model, tokens, attention_mask)
    spec = check_pos_embed(as_components(components, model), pos_embed)
    if pos_embed == "separate":  # the token level, with the position embedding its own component
        spec = TokensAndPosition().check(model)
    return Checked(tokens, mask, spec, keep_names(canonical_names(model), keep),
                   logit_positions(tokens, mask, logits),
                   None if logits_all(logits) else int(logits is not None))


def prepare_tokens(model: Model, tokens, attention_mask) -> tuple[Tensor, Tensor | None]:
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


def logits_all(logits: object) -> bool:
    return isinstance(logits, str) and logits == "all"


def check_pos_embed(spec, pos_embed: PosEmbed):
    if pos_embed == "separate" and spec != TokensAt(0):
        raise DepassError(f"pos_embed='separate' splits the token level (TokensAt(0)) only, not "
                          f"{type(spec).__name__}: leave pos_embed='with_token'")
    return spec
