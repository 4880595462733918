"""What the components are: their initial states at an entry hook, and their labels."""

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor

from tl_depass.engine.clean_run import CleanRun
from tl_depass.engine.validate import check_finite, given, public_fields, residual_hook
from tl_depass.errors import DepassError
from tl_depass.tolerances import completeness_rtol, relative_error

PosEmbed = Literal["with_token", "separate"]


@dataclass
class Entry:
    """Where a group's components enter: at `hook`, component rows `offset .. offset+k` take
    `rows(offset, k)`, the group's bias slot takes `bias` (None: zero)."""

    hook: str
    rows: Callable[[int, int], Tensor]
    bias: Tensor | None = None


@dataclass
class Group:
    """Components decomposed together: their shares sum to the clean activations. Several groups
    (one per layer for heads) ride in one folded forward."""

    labels: list[str]  # one per component, then the group's bias label
    entries: list[Entry]


def stored(hook: str, states: Tensor) -> Entry:
    return Entry(hook, lambda offset, k: states[offset:offset + k])


@public_fields
@dataclass(frozen=True)
class TokensAt:
    """One component per position, starting from the residual stream before block `layer`
    (`TokensAt(0)` is the token level, "tokens")."""

    layer: int

    @property
    def hook(self) -> str:
        return f"blocks.{self.layer}.hook_resid_pre"

    def check(self, model) -> "TokensAt":
        n = model.cfg.n_layers
        if not (isinstance(self.layer, int) and not isinstance(self.layer, bool) and 0 <= self.layer < n):
            raise DepassError(f"TokensAt({self.layer!r}): no hook blocks.{self.layer}.hook_resid_pre; "
                              f"layer must be an int in 0..{n - 1}")
        return self


@public_fields
@dataclass(frozen=True, eq=False)
class Split:
    """A user split of the residual stream at `hook`: `tensor[c]` is component c's share; the
    shares must sum to the clean activation there."""

    hook: str
    tensor: Tensor  # [component batch pos d_model], checked in split_states with a clear message
    labels: tuple[str, ...] | list[str] | None = None  # e.g. another decomposition's dec.labels

    def check(self, model) -> "Split":
        """Everything that can be checked before the clean run; the sum in split_states."""
        hook = residual_hook(model, self.hook, "Split")
        t, d = self.tensor, model.cfg.d_model
        if not isinstance(t, Tensor):
            raise DepassError(f"Split tensor must be a torch tensor [component, batch, pos, "
                              f"d_model], got {given(t)}")
        if not t.is_floating_point():
            raise DepassError(f"Split tensor must be floating point, got {t.dtype}")
        if t.ndim != 4 or t.shape[-1] != d or t.shape[0] == 0:
            raise DepassError(f"Split tensor has shape {tuple(t.shape)}; expected [component >= 1, "
                              f"batch, pos, d_model={d}] at {hook}")
        check_finite(t, "the Split tensor")
        if self.labels is not None:
            labels = list(self.labels)
            if not all(isinstance(x, str) for x in labels) or len(set(labels)) < len(labels):
                raise DepassError(f"Split labels must be distinct strings, got {given(labels)}")
            if len(labels) != len(t):
                raise DepassError(f"Split has {len(t)} components but {len(labels)} labels")
        return dataclasses.replace(self, hook=hook)


def as_components(components, model):
    """The component spec for `components`, checked against `model` (once, for the forward
    and the backward path alike)."""
    if isinstance(components, type):
        raise DepassError(f"components must be an instance such as {components.__name__}(), "
                          "not the class")
    if isinstance(components, str) and components == "tokens":
        components = TokensAt(0)
    if isinstance(components, (TokensAt, Split)) or hasattr(components, "groups"):
        check = getattr(components, "check", None)
        return components if check is None else check(model)
    raise DepassError(
        f"unknown components {components!r}; use 'tokens', tl_depass.TokensAt(layer), "
        "tl_depass.Split(hook, tensor), Heads(), Modules(), Neurons(layer), Subspace(hook, "
        "basis) or SAEFeatures(hook, sae)"
    )


def token_labels(model, tokens: Int[Tensor, "batch pos"], prefix: str = "") -> list[str]:
    if tokens.shape[0] > 1:
        return [f"{prefix}tok {p}" for p in range(tokens.shape[1])]
    if model.tokenizer is None:
        return [f"{prefix}tok {p} [{int(t)}]" for p, t in enumerate(tokens[0])]
    strs = model.to_str_tokens(tokens[0])
    return [f"{prefix}tok {p} {s!r}" for p, s in enumerate(strs)]


def by_position(resid: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "pos batch pos d_model"]:
    """Component p holds `resid` at position p and zero elsewhere."""
    eye = torch.eye(resid.shape[1], dtype=resid.dtype, device=resid.device)
    return torch.einsum("cp,bpd->cbpd", eye, resid)


def groups(
    spec, model, clean: CleanRun, tokens: Int[Tensor, "batch pos"],
    pos_embed: PosEmbed,
) -> list[Group]:
    """The groups of components of `spec` and where they enter."""
    if not isinstance(spec, (TokensAt, Split)):
        return spec.groups(model, clean)
    resid = clean[spec.hook]
    if isinstance(spec, Split):
        states, labels = split_states(spec, resid)
    elif spec.layer != 0:
        states, labels = by_position(resid), token_labels(model, tokens, f"L{spec.layer} ")
    elif pos_embed == "with_token":
        states, labels = by_position(resid), token_labels(model, tokens)
    elif model.cfg.positional_embedding_type != "standard":
        raise DepassError(
            f"pos_embed='separate' needs a learned position embedding in the residual stream; "
            f"this model's is {model.cfg.positional_embedding_type!r}: use pos_embed='with_token'"
        )
    else:
        pos = clean["hook_pos_embed"].expand_as(resid)
        states = torch.cat([by_position(resid - pos), pos[None]])
        labels = token_labels(model, tokens) + ["pos"]
    return [Group(labels + ["bias"], [stored(spec.hook, states)])]


def split_states(spec: Split, clean: Tensor) -> tuple[Tensor, list[str]]:
    t = spec.tensor  # checked in Split.check
    if t.shape[1:] != clean.shape:
        raise DepassError(
            f"Split tensor has shape {tuple(t.shape)}; expected [component, "
            f"{', '.join(map(str, clean.shape))}] (component, batch, pos, d_model) at {spec.hook}"
        )
    t = t.to(device=clean.device, dtype=clean.dtype)
    err, tol = relative_error(t.sum(0), clean), completeness_rtol(clean.dtype)
    if not err <= tol:  # NaN compares False
        raise DepassError(
            f"the Split components do not sum to the clean activation at {spec.hook}: relative "
            f"error {err:.2e} > {tol:.0e}. Build them from the clean value "
            f"(model.run_with_cache(tokens)[{spec.hook!r}]) so that they sum to it exactly"
        )
    labels = list(spec.labels) if spec.labels is not None else [f"part {i}" for i in range(len(t))]
    return t, labels
