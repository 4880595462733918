"""Components written at a layer, then propagated through every later layer with the frozen rules
(total effects): heads, attention and MLP modules, neurons, and MLP outputs by position (what
`transformer_lens.patching.get_act_patch_mlp_out` patches). One group per layer: "L{layer} rest"
(the residual stream entering the layer), the layer's components, "L{layer} bias"."""

from collections.abc import Sequence
from dataclasses import dataclass

import einops
import torch
from jaxtyping import Int
from torch import Tensor

from tl_depass.engine import hooks
from tl_depass.engine.backends import Model
from tl_depass.engine.clean_run import CleanRun
from tl_depass.engine.plan import mlp_site
from tl_depass.engine.validate import check_indices, check_layers, public_fields
from tl_depass.errors import DepassError
from tl_depass.levels.base import Entry, Group, Size, around, one_hot_rows, rest_entry
from tl_depass.levels.label import Label


@public_fields
@dataclass(frozen=True)
class Heads:
    """Every head of each chosen layer is a component from the point it writes to the residual
    stream (b_O goes to the bias); one group per layer, all in one folded forward."""

    layers: Sequence[int] | None = None

    def check(self, model: Model) -> "Heads":
        check_layers(model, self.layers, "Heads")
        return self

    def size(self, model: Model, pos: int) -> Size:
        return len(check_layers(model, self.layers, "Heads")), model.cfg.n_heads + 1, True

    def reads(self, model: Model) -> list[str]:
        return [h for layer in check_layers(model, self.layers, "Heads")
                for h in (hooks.resid_pre(layer), hooks.attn_z(layer))]

    def groups(self, model: Model, clean: CleanRun, tokens: Int[Tensor, "batch pos"]) -> list[Group]:
        out = []
        for layer in check_layers(model, self.layers, "Heads"):
            z = clean[hooks.attn_z(layer)]  # [batch pos head d_head]
            heads = range(z.shape[2])
            per_head = {1 + h: z * (torch.arange(z.shape[2], device=z.device) == h)[:, None]
                        for h in heads}
            out.append(Group(
                around(layer, [Label(f"L{layer}H{h}", "head", layer, h) for h in heads]),
                [rest_entry(clean, layer),
                 Entry(hooks.attn_z(layer),
                       lambda offset, k, f=per_head, z=z: one_hot_rows(0, offset, k, f, z))],
            ))
        return out


@public_fields
@dataclass(frozen=True)
class Modules:
    """The attention output and the MLP output of each chosen layer are components."""

    layers: Sequence[int] | None = None

    def check(self, model: Model) -> "Modules":
        check_layers(model, self.layers, "Modules")
        return self

    def size(self, model: Model, pos: int) -> Size:
        return len(check_layers(model, self.layers, "Modules")), 2 + (not model.cfg.attn_only), True

    def reads(self, model: Model) -> list[str]:
        return [h for layer in check_layers(model, self.layers, "Modules")
                for h in (hooks.resid_pre(layer), hooks.attn_z(layer))]

    def groups(self, model: Model, clean: CleanRun, tokens: Int[Tensor, "batch pos"]) -> list[Group]:
        out = []
        for layer in check_layers(model, self.layers, "Modules"):
            z = clean[hooks.attn_z(layer)]
            entries = [rest_entry(clean, layer),
                       Entry(hooks.attn_z(layer),
                             lambda offset, k, z=z: one_hot_rows(0, offset, k, {1: z}, z))]
            parts = [Label(f"L{layer} attn", "attn", layer)]
            if not model.cfg.attn_only:
                site = mlp_site(model, clean, layer)
                act = site.facts.act
                entries.append(Entry(site.act_hook, lambda offset, k, a=act: one_hot_rows(
                    0, offset, k, {2: a}, a), bias=site.facts.extra))
                parts.append(Label(f"L{layer} mlp", "mlp", layer))
            out.append(Group(around(layer, parts), entries))
        return out


@public_fields
@dataclass(frozen=True)
class Neurons:
    """Each chosen neuron's output `a_i W_out[i]` at `layer` is a component; "rest" is the
    post-MLP residual without them (b_out goes to the bias)."""

    layer: int
    neurons: Sequence[int] | None = None

    def check(self, model: Model) -> "Neurons":
        """Neuron ids must be distinct, in 0..d_mlp-1: -1 is refused, not read as the last."""
        check_indices([self.layer], model.cfg.n_layers, "Neurons: layer", "n_layers")
        if model.cfg.attn_only:
            raise DepassError("Neurons: this model is attention-only (no MLP neurons)")
        if self.neurons is not None:
            check_indices(self.neurons, model.cfg.d_mlp, "Neurons: neuron ids", "d_mlp")
        return self

    def size(self, model: Model, pos: int) -> Size:
        return 1, 1 + (model.cfg.d_mlp if self.neurons is None else len(self.neurons)), True

    def reads(self, model: Model) -> list[str]:
        return [hooks.resid_pre(self.layer)]  # and the MLP's frozen inputs

    def groups(self, model: Model, clean: CleanRun, tokens: Int[Tensor, "batch pos"]) -> list[Group]:
        layer = self.layer  # checked in Neurons.check
        site = mlp_site(model, clean, layer)
        act = site.facts.act  # [batch pos d_mlp]
        neurons = list(range(act.shape[-1])) if self.neurons is None else list(self.neurons)
        chosen = torch.tensor(neurons, device=act.device)
        rest = act.index_fill(-1, chosen, 0)

        def rows(offset, k):  # component 0 the rest, component r neuron r - 1 (one-hot rows)
            out = act.new_zeros((k, *act.shape))
            if offset == 0:
                out[0] = rest
            ids = chosen[max(offset, 1) - 1:offset + k - 1]
            part = out[len(out) - len(ids):]
            index = ids.reshape(-1, 1, 1, 1).expand(*part.shape[:-1], 1)
            part.scatter_(-1, index, einops.rearrange(act[..., ids], "b p k -> k b p 1"))
            return out

        def written(offset, k, weight):  # rows(offset, k) @ weight: a_i weight[i] for neuron i
            ids = chosen[max(offset, 1) - 1:offset + k - 1]
            out = einops.rearrange(act[..., ids], "b p k -> k b p 1") * weight[ids, None, None]
            return torch.cat([(rest @ weight)[None], out]) if offset == 0 else out

        labels = around(layer, [Label(f"L{layer}N{i}", "neuron", layer, i) for i in neurons])
        return [Group(labels, [rest_entry(clean, layer),
                               Entry(site.act_hook, rows, bias=site.facts.extra, written=written)])]


@dataclass(frozen=True)
class MLPByPosition:
    """Each position's MLP output at each layer is a component, "L{layer}P{pos}" (what
    `transformer_lens.patching.get_act_patch_mlp_out` patches)."""

    layers: tuple[int, ...] | None = None

    def check(self, model: Model) -> "MLPByPosition":
        check_layers(model, self.layers, "MLPByPosition")
        if model.cfg.attn_only:
            raise DepassError("MLPByPosition: this model is attention-only (no MLP)")
        return self

    def reads(self, model: Model) -> list[str]:
        return [hooks.resid_pre(layer) for layer in check_layers(model, self.layers, "MLPByPosition")]

    def groups(self, model: Model, clean: CleanRun, tokens: Int[Tensor, "batch pos"]) -> list[Group]:
        out = []
        n = clean.logits.shape[1]
        for layer in check_layers(model, self.layers, "MLPByPosition"):
            site = mlp_site(model, clean, layer)
            act = site.facts.act

            def rows(offset, k, act=act):
                x = act.new_zeros((k, *act.shape))
                for r in range(max(offset, 1), offset + k):
                    x[r - offset, :, r - 1] = act[:, r - 1]
                return x

            labels = around(layer, [Label(f"L{layer}P{p}", "mlp", layer, p) for p in range(n)])
            entries = [rest_entry(clean, layer), Entry(site.act_hook, rows, site.facts.extra)]
            out.append(Group(labels, entries))
        return out
