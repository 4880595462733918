"""Positions as components: each position's residual stream entering a block (the token level is
`TokensAt(0)`, "tokens"), optionally with the learned position embedding as a component."""

from dataclasses import dataclass
from typing import Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor

from tl_depass.engine import hooks
from tl_depass.engine.backends import Model
from tl_depass.engine.clean_run import CleanRun
from tl_depass.engine.validate import public_fields
from tl_depass.errors import DepassError
from tl_depass.levels.base import Entry, Group, Size
from tl_depass.levels.label import Label

PosEmbed = Literal["with_token", "separate"]


def token_labels(model: Model, tokens: Int[Tensor, "batch pos"], prefix: str = "") -> list[str]:
    """Display strings of the positions: "tok 2 'x'" (one prompt), "tok 2" (a batch)."""
    if tokens.shape[0] > 1:
        return [f"{prefix}tok {p}" for p in range(tokens.shape[1])]
    if model.tokenizer is None:
        return [f"{prefix}tok {p} [{t}]" for p, t in enumerate(tokens[0].tolist())]
    strs = model.to_str_tokens(tokens[0])
    return [f"{prefix}tok {p} {s!r}" for p, s in enumerate(strs)]


def by_position(resid: Float[Tensor, "batch pos d_model"], offset: int = 0, k: int | None = None
                ) -> Float[Tensor, "component batch pos d_model"]:
    """Components offset .. offset+k (default: all) of the token level: component p holds `resid`
    at position p and zero elsewhere. Built per chunk, so that the [pos, batch, pos, d_model]
    stack never exists whole when chunk_size is small."""
    n = resid.shape[1]
    k = n - offset if k is None else min(k, n - offset)
    out = resid.new_zeros((k, *resid.shape))
    p = torch.arange(offset, offset + k, device=resid.device)
    out[p - offset, :, p] = resid[:, p].transpose(0, 1)  # [k, batch, d_model]
    return out


def position_entry(hook: str, resid: Float[Tensor, "batch pos d_model"],
                   extra: Tensor | None = None) -> Entry:
    """The token level's entry: each chunk's rows built when the chunk runs; `extra`
    [batch, pos, d_model] (the position embedding) is one more component after the positions."""
    n = resid.shape[1]

    def rows(offset: int, k: int) -> Tensor:
        part = by_position(resid, offset, k)
        if extra is None or offset + k <= n:
            return part
        return torch.cat([part, extra[None]])

    def first(offset: int, k: int) -> int:  # the position embedding is non-zero everywhere
        return offset if extra is None or offset + k <= n else 0
    return Entry(hook, rows, first=first)


@public_fields
@dataclass(frozen=True)
class TokensAt:
    """One component per position, starting from the residual stream before block `layer`
    (`TokensAt(0)` is the token level, "tokens")."""

    layer: int

    @property
    def hook(self) -> str:
        return hooks.resid_pre(self.layer)

    def check(self, model: Model) -> "TokensAt":
        n = model.cfg.n_layers
        if not (isinstance(self.layer, int) and not isinstance(self.layer, bool) and 0 <= self.layer < n):
            raise DepassError(f"TokensAt({self.layer!r}): no hook {self.hook}; "
                              f"layer must be an int in 0..{n - 1}")
        return self

    def reads(self, model: Model) -> list[str]:
        return [self.hook]

    def size(self, model: Model, pos: int) -> Size:
        return 1, pos, True

    def labels(self, model: Model, tokens: Int[Tensor, "batch pos"]) -> list[Label]:
        prefix = f"L{self.layer} " if self.layer else ""
        return [Label(name, "token", self.layer, p)
                for p, name in enumerate(token_labels(model, tokens, prefix))]

    def groups(self, model: Model, clean: CleanRun, tokens: Int[Tensor, "batch pos"]) -> list[Group]:
        labels = self.labels(model, tokens) + [Label("bias", "bias")]
        return [Group(labels, [position_entry(self.hook, clean[self.hook])])]


@dataclass(frozen=True)
class TokensAndPosition(TokensAt):
    """The token level with the learned position embedding as a component of its own ("pos"),
    after the tokens: what `decompose(pos_embed="separate")` decomposes."""

    layer: int = 0

    def check(self, model: Model) -> "TokensAndPosition":
        super().check(model)
        if model.cfg.positional_embedding_type != "standard":
            raise DepassError(
                f"pos_embed='separate' needs a learned position embedding in the residual stream; "
                f"this model's is {model.cfg.positional_embedding_type!r}: use pos_embed='with_token'"
            )
        return self

    def size(self, model: Model, pos: int) -> Size:
        return 1, pos + 1, True  # and the position embedding

    def groups(self, model: Model, clean: CleanRun, tokens: Int[Tensor, "batch pos"]) -> list[Group]:
        # hook_pos_embed is a frozen input: always recorded
        resid = clean[self.hook]
        pos = clean["hook_pos_embed"].expand_as(resid)
        labels = self.labels(model, tokens) + [Label("pos", "pos", 0), Label("bias", "bias")]
        return [Group(labels, [position_entry(self.hook, resid - pos, pos)])]
