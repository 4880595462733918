"""Splits of one residual activation: a user's split (`Split`), parts in named subspaces
(`Subspace`) and SAE features (`SAEFeatures`). Their components enter at that one hook."""

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Int
from torch import Tensor

from tl_depass.engine.backends import Model
from tl_depass.engine.clean_run import CleanRun
from tl_depass.engine.validate import check_finite, check_indices, given, public_fields, residual_hook
from tl_depass.errors import DepassError
from tl_depass.levels.base import Group, Size, stored
from tl_depass.levels.label import Label
from tl_depass.tolerances import completeness_rtol, relative_error

BIAS = Label("bias", "bias")


@public_fields
@dataclass(frozen=True, eq=False)
class Split:
    """A user split of the residual stream at `hook`: `tensor[c]` is component c's share; the
    shares must sum to the clean activation there."""

    hook: str
    tensor: Tensor  # [component batch pos d_model], checked in split_states with a clear message
    labels: tuple[str, ...] | list[str] | None = None  # e.g. another decomposition's dec.labels

    def check(self, model: Model) -> "Split":
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

    def size(self, model: Model, pos: int) -> Size:
        return 1, self.tensor.shape[0], True

    def reads(self, model: Model) -> list[str]:
        return [self.hook]

    def groups(self, model: Model, clean: CleanRun, tokens: Int[Tensor, "batch pos"]) -> list[Group]:
        states, names = split_states(self, clean[self.hook])
        labels = [Label(name, "part", index=i) for i, name in enumerate(names)]
        return [Group(labels + [BIAS], [stored(self.hook, states)])]


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


def resid_at(clean: CleanRun, hook: str, what: str, d_model: int) -> Tensor:
    if hook not in clean.values:
        raise DepassError(f"{what}: no recorded activation at {hook!r}; use a residual hook")
    x = clean[hook]
    if x.shape[-1] != d_model or x.ndim != 3:
        raise DepassError(f"{what}: {hook} is {tuple(x.shape)}, not [batch, pos, d_model]")
    return x


@public_fields
@dataclass(frozen=True, eq=False)
class Subspace:
    """Split the activation at `hook` into its parts in the span of each basis
    (`[d_model, k]`, need not be orthonormal) and the orthogonal remainder ("rest"). Several
    named bases at once (a dict) must be linearly independent together."""

    hook: str
    basis: Tensor | dict

    def named(self) -> dict:
        return self.basis if isinstance(self.basis, dict) else {"subspace": self.basis}

    def check(self, model: Model) -> "Subspace":
        hook = residual_hook(model, self.hook, "Subspace")
        named = self.named()
        if not named:
            raise DepassError("Subspace: no basis given; pass a [d_model, k] basis or a dict of them")
        d = model.cfg.d_model
        for name, b in named.items():
            try:
                b = torch.as_tensor(b)
            except (TypeError, ValueError, RuntimeError):
                raise DepassError(f"Subspace {name!r}: basis must be a tensor [d_model={d}, k], "
                                  f"got {given(b)}") from None
            if b.ndim != 2 or b.shape[0] != d or b.shape[1] == 0:
                raise DepassError(f"Subspace {name!r}: basis is {tuple(b.shape)}, expected "
                                  f"[d_model={d}, k >= 1]")
            check_finite(b.double(), f"Subspace {name!r}: the basis")
        return dataclasses.replace(self, hook=hook)

    def size(self, model: Model, pos: int) -> Size:
        return 1, 1 + (len(self.basis) if isinstance(self.basis, dict) else 1), True

    def reads(self, model: Model) -> list[str]:
        return [self.hook]

    def groups(self, model: Model, clean: CleanRun, tokens: Int[Tensor, "batch pos"]) -> list[Group]:
        named = self.named()
        x = resid_at(clean, self.hook, "Subspace", model.cfg.d_model)
        bases = [torch.as_tensor(b, dtype=x.dtype, device=x.device) for b in named.values()]
        joint = torch.cat(bases, 1)
        if torch.linalg.matrix_rank(joint) < joint.shape[1]:
            raise DepassError("Subspace: the bases are not linearly independent (overlapping or "
                              "degenerate subspaces); merge or orthogonalise them")
        coef = torch.linalg.lstsq(joint, x.reshape(-1, x.shape[-1]).T).solution  # [k, batch*pos]
        parts, start = [], 0
        for b in bases:
            c = coef[start:start + b.shape[1]]
            parts.append((b @ c).T.reshape(x.shape))
            start += b.shape[1]
        states = torch.stack(parts + [x - sum(parts)])
        labels = [Label(str(name), "subspace", index=i) for i, name in enumerate(named)]
        return [Group(labels + [Label("rest", "rest"), BIAS], [stored(self.hook, states)])]


@public_fields
@dataclass(frozen=True, eq=False)
class SAEFeatures:
    """Split the activation at `hook` into the chosen SAE features' decoder contributions
    `f_i W_dec[i]`, the other features, `b_dec`, and the SAE's error, which sum exactly to it.
    `sae`: a sae_lens SAE (its `encode` is used) or a tuple (W_enc, b_enc, W_dec, b_dec) of a
    ReLU SAE. `features=None`: every feature active somewhere in the batch."""

    hook: str
    sae: object
    features: Sequence[int] | None = None

    def check(self, model: Model) -> "SAEFeatures":
        hook = residual_hook(model, self.hook, "SAEFeatures")
        if isinstance(self.sae, tuple) and len(self.sae) != 4:
            raise DepassError(f"SAEFeatures: sae must be (W_enc, b_enc, W_dec, b_dec), got a tuple "
                              f"of {len(self.sae)}")
        W_dec = self.sae[2] if isinstance(self.sae, tuple) else getattr(self.sae, "W_dec", None)
        if not isinstance(W_dec, Tensor) or W_dec.ndim != 2:
            raise DepassError("SAEFeatures: sae must be a sae_lens SAE or a tuple (W_enc, b_enc, "
                              f"W_dec, b_dec) of tensors; its W_dec is {given(W_dec)}")
        if self.features is not None:
            check_indices(self.features, W_dec.shape[0], "SAEFeatures: features", "d_sae")
        return dataclasses.replace(self, hook=hook)

    def size(self, model: Model, pos: int) -> Size:
        """Exact for chosen features; features=None: the active ones, known after the clean run."""
        known = self.features is not None
        return 1, 3 + (len(self.features) if known else 0), known

    def reads(self, model: Model) -> list[str]:
        return [self.hook]

    def groups(self, model: Model, clean: CleanRun, tokens: Int[Tensor, "batch pos"]) -> list[Group]:
        x = resid_at(clean, self.hook, "SAEFeatures", model.cfg.d_model)
        if isinstance(self.sae, tuple):
            W_enc, b_enc, W_dec, b_dec = (torch.as_tensor(t).to(x) for t in self.sae)
            f = torch.relu((x - b_dec) @ W_enc + b_enc)
        else:
            W_dec, b_dec = self.sae.W_dec.detach().to(x), self.sae.b_dec.detach().to(x)
            with torch.no_grad():
                f = self.sae.encode(x.to(self.sae.W_dec.dtype)).to(x)
        if W_dec.shape != (f.shape[-1], x.shape[-1]):
            raise DepassError(f"SAEFeatures: W_dec is {tuple(W_dec.shape)}, expected "
                              f"[d_sae={f.shape[-1]}, d_model={x.shape[-1]}]")
        features = (torch.nonzero(f.flatten(0, 1).abs().amax(0)).flatten().tolist()
                    if self.features is None else list(self.features))
        recon = f @ W_dec + b_dec
        chosen = [f[..., i, None] * W_dec[i] for i in features]
        others = recon - b_dec - sum(chosen, torch.zeros_like(x))
        states = torch.stack(chosen + [others, b_dec.expand_as(x), x - recon])
        check_finite(states, f"SAEFeatures at {self.hook}: the SAE's reconstruction")
        labels = [Label(f"F{i}", "feature", index=i) for i in features] + [
            Label("other features", "other features"), Label("b_dec", "b_dec"),
            Label("SAE error", "error"), BIAS]
        return [Group(labels, [stored(self.hook, states)])]
