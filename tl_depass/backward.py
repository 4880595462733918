"""The backward path of `attribute`: gradient x activation through the frozen model, exact for
the linear rule (mlp_rule="ratio"): one recorded clean run, one forward with the frozen hooks, one
backward, for every component of a level at once, each group's rest and bias included.

A group's components enter at its entries in forward order (the rest at `resid_pre`, heads at
`hook_z`, the MLP at its activation); the folded forward overwrites a later entry for every
earlier component, so a component's share is its "own" gradient (the paths that pass no later
entry of its group) x its activation. Classifying each path by the LAST entry it passes gives
own(i) = grad(i) - sum over later entries j of VJP(j <- i, own(j)), exactly, in one backward.
The bias is the clean readout less every other share of the group (the frozen model is affine:
its constant term)."""

from collections.abc import Callable
from dataclasses import dataclass, field

import einops
import torch
from jaxtyping import Float, Int
from torch import Tensor

from tl_depass.engine.backends import Model, forward_as_recorded
from tl_depass.engine.clean_run import CleanRun, record_clean_run
from tl_depass.engine.frozen import FROZEN_INPUTS, frozen_hooks
from tl_depass.engine.hooks import attn_z, block_hook, resid_pre
from tl_depass.engine.replay import mlp_site
from tl_depass.engine.validate import check_layers
from tl_depass.levels import Heads, Label, Modules, Neurons, TokensAt

Score = Callable[[Tensor], Tensor]  # own gradient at an entry -> [batch, component]


@dataclass
class Site:
    hook: str  # where the gradient is taken (an entry of the group)
    score: Score | None  # own gradient there -> the named components' shares [batch, component]
    labels: list[Label] = field(default_factory=list)
    rest: Score | None = None  # own gradient there -> the group's rest's part [batch, 1]


@dataclass
class Group:
    """One group's entries in forward order, and the labels of its rest (if it has one) and bias."""

    sites: list[Site]
    rest: Label | None
    bias: Label


@dataclass
class Shares:
    labels: list[Label]  # the named components
    shares: Float[Tensor, "component batch"]
    remainder_labels: list[Label]  # each group's rest (if any) and bias, as decompose has them
    remainder: Float[Tensor, "remainder batch"]
    metric: Float[Tensor, " batch"]  # the clean readout: per group, every share sums to it


def summed(x: Tensor) -> Score:
    """g -> sum of g * x over everything but the batch axis, [batch, 1]."""
    return lambda g: (g * x).flatten(1).sum(1, True)


def around(layer: int, group: int, sites: list[Site]) -> Group:
    return Group(sites, Label(f"L{layer} rest", "rest", layer, None, group),
                 Label(f"L{layer} bias", "bias", layer, None, group))


def groups(spec, model: Model, clean: CleanRun, tokens: Int[Tensor, "batch pos"],
           mask: Tensor | None) -> list[Group]:
    """The groups of `spec` as the forward path builds them (levels/), as gradient sites."""
    if isinstance(spec, TokensAt):
        x = clean[spec.hook]
        if mask is not None:  # padding is no component: its share is 0, as on the forward path
            x = x * mask.to(x.device)[..., None]
        return [Group([Site(spec.hook, lambda g: (g * x).sum(-1), spec.labels(model, tokens))],
                      None, Label("bias", "bias"))]
    if isinstance(spec, Neurons):
        (layer,) = check_layers(model, [spec.layer], "Neurons")
        site = mlp_site(model, clean, block_hook(layer, "mlp"))
        act = site.facts.act
        chosen = list(range(act.shape[-1])) if spec.neurons is None else list(spec.neurons)
        others = act.index_fill(-1, torch.tensor(chosen, device=act.device), 0)
        return [around(layer, 0, [
            Site(resid_pre(layer), None, rest=summed(clean[resid_pre(layer)])),
            Site(site.act_hook, lambda g: (g * act).sum(1)[:, chosen],
                 [Label(f"L{layer}N{i}", "neuron", layer, i) for i in chosen], rest=summed(others))])]
    if not isinstance(spec, (Heads, Modules)):
        raise TypeError(f"no backward sites for {type(spec).__name__}")  # attribute() checks first
    out = []
    for group, layer in enumerate(check_layers(model, spec.layers, type(spec).__name__)):
        z = clean[attn_z(layer)]  # [batch pos head_index d_head]
        sites = [Site(resid_pre(layer), None, rest=summed(clean[resid_pre(layer)]))]
        if isinstance(spec, Heads):
            sites.append(Site(attn_z(layer), lambda g, z=z: (g * z).sum((1, 3)),
                              [Label(f"L{layer}H{h}", "head", layer, h, group)
                               for h in range(z.shape[2])]))
        else:
            sites.append(Site(attn_z(layer), summed(z), [Label(f"L{layer} attn", "attn", layer, None,
                                                               group)]))
            if not model.cfg.attn_only:  # the layer's MLP output is a component of its own
                site = mlp_site(model, clean, block_hook(layer, "mlp"))
                sites.append(Site(site.act_hook, summed(site.facts.act),
                                  [Label(f"L{layer} mlp", "mlp", layer, None, group)]))
        out.append(around(layer, group, sites))
    return out


def read_rows(at: Int[Tensor, " batch"]) -> Callable:
    """At `unembed.hook_in`: only the read position of each batch row goes on to the unembedding
    ([batch, 1, d_model]), so the logits of no other position are computed (nor differentiated)."""
    def hook(x, hook):
        rows, where = torch.arange(at.shape[0], device=x.device), at.to(x.device)
        if x.ndim == 2:  # a model that flattens the token axes: [batch*pos, d_model]
            return x.unflatten(0, (at.shape[0], -1))[rows, where]
        return x[rows, where][:, None]
    return hook


def own_gradients(parts: list[Group], captured: dict[str, Tensor], grads: dict[str, Tensor]
                  ) -> dict[str, Tensor]:
    """Each entry's own gradient: grad(i) less VJP(j <- i, own(j)) for every later entry j of
    its group (the paths whose last entry is j), later entries first."""
    own = {}
    for part in parts:
        later: list[str] = []
        for site in reversed(part.sites):
            g = grads[site.hook]
            for j in later:
                (via,) = torch.autograd.grad(captured[j], captured[site.hook], own[j],
                                             retain_graph=True, allow_unused=True)
                if via is not None:
                    g = g - via
            own[site.hook] = g
            later.append(site.hook)
    return own


def backward(model: Model, tokens: Int[Tensor, "batch pos"], mask: Int[Tensor, "batch pos"] | None,
             spec, readout: Callable[[Tensor], Tensor], at: Int[Tensor, " batch"]) -> Shares:
    """Gradient x activation through the frozen model for the readout of the logits at `at`
    (`readout`: [batch, d_vocab] -> [batch]): the clean run is recorded once, then one forward
    with the frozen hooks and one backward. The shares are on the tokens' device."""
    entries = {spec.hook} if isinstance(spec, TokensAt) else {resid_pre(layer) for layer in (
        [spec.layer] if isinstance(spec, Neurons) else check_layers(model, spec.layers, "layers"))}
    clean = record_clean_run(model, tokens, mask, lambda n: n.endswith(FROZEN_INPUTS) or n in entries)
    parts = groups(spec, model, clean, tokens, mask)
    captured: dict[str, Tensor] = {}
    names = list(dict.fromkeys(s.hook for part in parts for s in part.sites))
    first = resid_pre(0)  # the graph starts here: every later hook is differentiable

    def capture(name):
        def hook(x, hook):  # a new tensor, which the model goes on with (as a Bridge requires)
            captured[name] = y = x.detach().requires_grad_(True) if name == first else x.clone()
            return y
        return hook

    # Captured after the frozen hooks: what they replace (hook_z, the MLP activation) is captured
    # as replaced; nothing captured here is an input the frozen hooks stash.
    hooks = ([(first, capture(first))] + frozen_hooks(model, clean)
             + [(n, capture(n)) for n in names if n != first]
             + [("unembed.hook_in", read_rows(at)), ("unembed.hook_out", capture("logits"))])
    with torch.enable_grad(), forward_as_recorded(model), model.hooks(fwd_hooks=hooks):
        model(tokens, attention_mask=mask)
        value = readout(captured.pop("logits").reshape(tokens.shape[0], -1)).sum()
        grads = dict(zip(names, torch.autograd.grad(value, [captured[n] for n in names],
                                                    retain_graph=True, materialize_grads=True),
                         strict=True))
        own = own_gradients(parts, captured, grads)
    home = tokens.device
    clean_logits = clean["unembed.hook_out"]  # pre-softcap, as the readout reads them
    metric = readout(clean_logits[torch.arange(len(at), device=clean_logits.device),
                                  at.to(clean_logits.device)]).detach().to(home)
    named, remainder, rest_labels = [], [], []
    for part in parts:
        scores = [s.score(own[s.hook]).detach().to(home) for s in part.sites if s.score]
        rests = [s.rest(own[s.hook]).detach().to(home) for s in part.sites if s.rest]
        mine = torch.cat(scores, dim=1)  # [batch, component]
        total = mine.sum(1)
        if part.rest is not None:
            rest = torch.cat(rests, dim=1).sum(1)
            remainder.append(rest)
            rest_labels.append(part.rest)
            total = total + rest
        remainder.append(metric - total)
        rest_labels.append(part.bias)
        named.append(mine)
    shares = einops.rearrange(torch.cat(named, dim=1), "batch component -> component batch")
    return Shares([x for part in parts for s in part.sites for x in s.labels], shares.contiguous(),
                  rest_labels, torch.stack(remainder), metric)
