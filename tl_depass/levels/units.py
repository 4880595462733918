"""Component levels beyond tokens: heads, modules, neurons (written at a layer, then propagated
through every later layer with the frozen rules: total effects), and subspaces / SAE features
(splits of a residual activation)."""

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from tl_depass.engine.clean_run import CleanRun
from tl_depass.engine.replay import mlp_site
from tl_depass.engine.validate import (
    check_finite,
    check_indices,
    check_layers,
    given,
    public_fields,
    residual_hook,
)
from tl_depass.errors import DepassError
from tl_depass.levels.components import Entry, Group, stored


def one_hot_rows(n: int, offset: int, k: int, fill: dict[int, Tensor], like: Tensor) -> Tensor:
    """Rows offset..offset+k of an n-row stack that is `fill[row]` where given, zero elsewhere."""
    out = like.new_zeros((k, *like.shape))
    for row, value in fill.items():
        if offset <= row < offset + k:
            out[row - offset] = value
    return out


def rest_entry(clean: CleanRun, layer: int) -> Entry:
    """Before layer `layer`, the group's first component ("rest") is the whole clean residual."""
    resid = clean[f"blocks.{layer}.hook_resid_pre"]
    return Entry(f"blocks.{layer}.hook_resid_pre",
                 lambda offset, k: one_hot_rows(0, offset, k, {0: resid}, resid))


@public_fields
@dataclass(frozen=True)
class Heads:
    """Every head of each chosen layer is a component from the point it writes to the residual
    stream (b_O goes to the bias); one group per layer, all in one folded forward."""

    layers: Sequence[int] | None = None

    def check(self, model) -> "Heads":
        check_layers(model, self.layers, "Heads")
        return self

    def groups(self, model, clean: CleanRun) -> list[Group]:
        out = []
        for layer in check_layers(model, self.layers, "Heads"):
            z = clean[f"blocks.{layer}.attn.hook_z"]  # [batch pos head d_head]
            heads = range(z.shape[2])
            per_head = {1 + h: z * (torch.arange(z.shape[2]) == h)[:, None] for h in heads}
            out.append(Group(
                [f"L{layer} rest"] + [f"L{layer}H{h}" for h in heads] + [f"L{layer} bias"],
                [rest_entry(clean, layer),
                 Entry(f"blocks.{layer}.attn.hook_z",
                       lambda offset, k, f=per_head, z=z: one_hot_rows(0, offset, k, f, z))],
            ))
        return out


@public_fields
@dataclass(frozen=True)
class Modules:
    """The attention output and the MLP output of each chosen layer are components."""

    layers: Sequence[int] | None = None

    def check(self, model) -> "Modules":
        check_layers(model, self.layers, "Modules")
        return self

    def groups(self, model, clean: CleanRun) -> list[Group]:
        out = []
        for layer in check_layers(model, self.layers, "Modules"):
            z = clean[f"blocks.{layer}.attn.hook_z"]
            entries = [rest_entry(clean, layer),
                       Entry(f"blocks.{layer}.attn.hook_z",
                             lambda offset, k, z=z: one_hot_rows(0, offset, k, {1: z}, z))]
            labels = [f"L{layer} rest", f"L{layer} attn"]
            if not model.cfg.attn_only:
                site = mlp_site(model, clean, f"blocks.{layer}.mlp")
                act = site.facts.act
                entries.append(Entry(site.act_hook, lambda offset, k, a=act: one_hot_rows(
                    0, offset, k, {2: a}, a), bias=site.facts.extra))
                labels.append(f"L{layer} mlp")
            out.append(Group(labels + [f"L{layer} bias"], entries))
        return out


@public_fields
@dataclass(frozen=True)
class Neurons:
    """Each chosen neuron's output `a_i W_out[i]` at `layer` is a component; "rest" is the
    post-MLP residual without them (b_out goes to the bias)."""

    layer: int
    neurons: Sequence[int] | None = None

    def check(self, model) -> "Neurons":
        """Neuron ids must be distinct, in 0..d_mlp-1: -1 is refused, not read as the last."""
        check_indices([self.layer], model.cfg.n_layers, "Neurons: layer", "n_layers")
        if model.cfg.attn_only:
            raise DepassError("Neurons: this model is attention-only (no MLP neurons)")
        if self.neurons is not None:
            check_indices(self.neurons, model.cfg.d_mlp, "Neurons: neuron ids", "d_mlp")
        return self

    def groups(self, model, clean: CleanRun) -> list[Group]:
        layer = self.layer  # checked in Neurons.check
        site = mlp_site(model, clean, f"blocks.{layer}.mlp")
        act = site.facts.act  # [batch pos d_mlp]
        neurons = list(range(act.shape[-1])) if self.neurons is None else list(self.neurons)
        chosen = torch.tensor(neurons, device=act.device)
        rest = act.index_fill(-1, chosen, 0)

        def rows(offset, k):
            out = act.new_zeros((k, *act.shape))
            for r in range(offset, offset + k):
                if r == 0:
                    out[0] = rest
                else:
                    i = neurons[r - 1]
                    out[r - offset, ..., i] = act[..., i]
            return out

        labels = [f"L{layer} rest"] + [f"L{layer}N{i}" for i in neurons] + [f"L{layer} bias"]
        return [Group(labels, [rest_entry(clean, layer),
                               Entry(site.act_hook, rows, bias=site.facts.extra)])]


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

    def check(self, model) -> "Subspace":
        hook = residual_hook(model, self.hook, "Subspace")
        named = self.basis if isinstance(self.basis, dict) else {"subspace": self.basis}
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

    def groups(self, model, clean: CleanRun) -> list[Group]:
        named = self.basis if isinstance(self.basis, dict) else {"subspace": self.basis}
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
        return [Group(list(named) + ["rest", "bias"], [stored(self.hook, states)])]


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

    def check(self, model) -> "SAEFeatures":
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

    def groups(self, model, clean: CleanRun) -> list[Group]:
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
        labels = [f"F{i}" for i in features] + ["other features", "b_dec", "SAE error", "bias"]
        return [Group(labels, [stored(self.hook, states)])]
