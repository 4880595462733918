"""The backward path of `attribute`: gradient x activation through the frozen model, exact for
the linear rule (mlp_rule="ratio"): one forward that freezes the model at its own values as it
computes them (no separate clean run), one backward, for every component of a level at once,
each group's rest and bias included.

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

from tl_depass.engine.backends import Model, canonical_names, forward_as_recorded
from tl_depass.engine.clean_run import CleanRun, Recorder, record_clean_run, unflatten_rows
from tl_depass.engine.frozen import freeze_own
from tl_depass.engine.hooks import attn_z, block_hook, resid_pre
from tl_depass.engine.replay import mlp_site
from tl_depass.engine.validate import check_layers
from tl_depass.errors import DepassError
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


def entry_hooks(spec, model: Model, layers: list[int], known: dict[str, str]
                ) -> tuple[list[str], list[str]]:
    """The hooks where `groups(spec, ...)` takes gradients (entries; hook_mid and hook_post both
    for an MLP: the first to fire is the activation) and the MLP hooks whose clean values it reads."""
    if isinstance(spec, TokensAt):
        return [spec.hook], []
    attn = [] if isinstance(spec, Neurons) else [attn_z(layer) for layer in layers]
    mlp = [] if isinstance(spec, Heads) or model.cfg.attn_only else [
        f"{block_hook(layer, 'mlp')}.{n}" for layer in layers
        for n in ("hook_pre", "hook_pre_linear", "hook_mid", "hook_post")]
    sites = [resid_pre(layer) for layer in layers] + attn + [n for n in mlp if n.endswith(
        ("hook_mid", "hook_post"))]
    return [n for n in sites if n in known], [n for n in mlp if n in known]


def read_rows(at: Int[Tensor, " batch"]) -> Callable:
    """The unembedding's input (a hook's value) at the read position of each batch row
    ([batch, 1, d_model]): the logits of no other position are differentiated."""
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
    (`readout`: [batch, d_vocab] -> [batch]): one forward that freezes the model at its own values
    as it computes them (`freeze_own`, recording what the clean run would), then the read rows'
    unembedding and one backward. The shares are on the tokens' device."""
    layers = [] if isinstance(spec, TokensAt) else [spec.layer] if isinstance(spec, Neurons) else \
        check_layers(model, spec.layers, "layers")
    known = canonical_names(model)
    sites, mlp = entry_hooks(spec, model, layers, known)
    # What `groups` reads: the entries' values (their captures, below) and the MLP's
    # pre-activations (recorded here).
    recorder = Recorder(tuple(tokens.shape), lambda name: True, check=False)
    captured: dict[str, Tensor] = {}
    first = resid_pre(0)  # the graph starts here: every later hook is differentiable

    def capture(name):
        def hook(x, hook):  # a new tensor, which the model goes on with (as a Bridge requires)
            captured[name] = y = x.detach().requires_grad_(True) if name == first else x.clone()
            return y
        return hook

    # The entries at hook_z and the MLP activation are what the freezing hooks return (the
    # model's own value, the frozen model's gradient); the others are captured here.
    hooks = ([(first, capture(first))]
             + [(n, recorder.hook(n)) for n in mlp if n.endswith(("hook_pre", "hook_pre_linear"))]
             + freeze_own(model, tuple(tokens.shape), known, captured)
             + [(n, capture(n)) for n in sites if n != first and n.endswith("resid_pre")]
             + [("unembed.hook_in", lambda x, hook: captured.update(final=x)),
                ("unembed.hook_out", lambda x, hook: captured.update(logits=x.detach()))])
    with torch.enable_grad(), forward_as_recorded(model):
        with model.hooks(fwd_hooks=hooks):
            logits = model(tokens, attention_mask=mask)
        try:  # the clean run's check; only if it fails is the clean run recorded, to name the hook
            clean = recorder.finish(logits.detach(), mask)
        except DepassError:
            record_clean_run(model, tokens, mask, lambda name: False)
            raise
        clean.order += [n for n in sites if n in captured]  # which fired (hook_mid: SoLU)
        clean.values |= {n: unflatten_rows(captured[n].detach(), *tokens.shape)
                         for n in [*sites, "logits"] if n in captured}
        # the read rows' logits again, differentiably: the frozen forward unembedded every
        # position, as the clean run does, so its logits (the metric) are the clean run's
        read = model.unembed(read_rows(at)(captured.pop("final"), None))
        value = readout(read.reshape(tokens.shape[0], -1)).sum()
        parts = groups(spec, model, clean, tokens, mask)
        names = list(dict.fromkeys(s.hook for part in parts for s in part.sites))
        grads = dict(zip(names, torch.autograd.grad(value, [captured[n] for n in names],
                                                    retain_graph=True, materialize_grads=True),
                         strict=True))
        own = own_gradients(parts, captured, grads)
    home = tokens.device
    clean_logits = clean["logits"]  # unembed.hook_out: pre-softcap, as the readout reads them
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
