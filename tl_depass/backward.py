"""The backward path of `attribute`: gradient x activation through the frozen model, exact for
the linear rule (mlp_rule="ratio"): one recorded clean run, one forward with the frozen hooks, one
backward, for every component of a level at once."""

from collections.abc import Callable
from dataclasses import dataclass

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


@dataclass
class Site:
    hook: str  # where the gradient is taken
    score: Callable[[Tensor], Tensor]  # gradient there -> [batch, component]
    labels: list[Label]
    not_via: str | None = None  # a hook whose path to the readout is not this component's


def sites(spec, model: Model, clean: CleanRun, tokens: Int[Tensor, "batch pos"]) -> list[Site]:
    """Where each component of `spec` enters, and how gradient x activation splits into them."""
    if isinstance(spec, TokensAt):
        x = clean[spec.hook]
        return [Site(spec.hook, lambda g: (g * x).sum(-1), spec.labels(model, tokens))]
    out = []
    if isinstance(spec, (Heads, Modules)):  # one group per layer, as the forward path's
        for group, layer in enumerate(check_layers(model, spec.layers, type(spec).__name__)):
            z = clean[attn_z(layer)]  # [batch pos head_index d_head]
            if isinstance(spec, Heads):
                out.append(Site(attn_z(layer), lambda g, z=z: (g * z).sum((1, 3)),
                                [Label(f"L{layer}H{h}", "head", layer, h, group)
                                 for h in range(z.shape[2])]))
                continue
            attn = [Label(f"L{layer} attn", "attn", layer, None, group)]
            if model.cfg.attn_only:
                out.append(Site(attn_z(layer), lambda g, z=z: (g * z).flatten(1).sum(1, True), attn))
            else:  # the layer's MLP output is a component of its own: not the attention's share
                out.append(Site(attn_z(layer), lambda g, z=z: (g * z).flatten(1).sum(1, True),
                                attn, not_via=block_hook(layer, "mlp.hook_pre")))
                site = mlp_site(model, clean, block_hook(layer, "mlp"))
                out.append(Site(site.act_hook, lambda g, a=site.facts.act: (g * a).flatten(1).sum(1, True),
                                [Label(f"L{layer} mlp", "mlp", layer, None, group)]))
        return out
    if isinstance(spec, Neurons):
        (layer,) = check_layers(model, [spec.layer], "Neurons")
        site = mlp_site(model, clean, block_hook(layer, "mlp"))
        act = site.facts.act
        chosen = list(range(act.shape[-1])) if spec.neurons is None else list(spec.neurons)
        return [Site(site.act_hook, lambda g: (g * act).sum(1)[:, chosen],
                     [Label(f"L{layer}N{i}", "neuron", layer, i) for i in chosen])]
    raise TypeError(f"no backward sites for {type(spec).__name__}")  # attribute() checks first


def read_rows(at: Int[Tensor, " batch"]) -> Callable:
    """At `unembed.hook_in`: only the read position of each batch row goes on to the unembedding
    ([batch, 1, d_model]), so the logits of no other position are computed (nor differentiated)."""
    def hook(x, hook):
        rows = torch.arange(at.shape[0], device=x.device)
        if x.ndim == 2:  # a model that flattens the token axes: [batch*pos, d_model]
            return x.unflatten(0, (at.shape[0], -1))[rows, at]
        return x[rows, at][:, None]
    return hook


def backward(model: Model, tokens: Int[Tensor, "batch pos"], mask: Int[Tensor, "batch pos"] | None,
             spec, readout: Callable[[Tensor], Tensor], at: Int[Tensor, " batch"]
             ) -> tuple[list[Label], Float[Tensor, "component batch"]]:
    """Gradient x activation through the frozen model for the readout of the logits at `at`
    (`readout`: [batch, d_vocab] -> a scalar): the clean run is recorded once, then one forward
    with the frozen hooks and one backward."""
    entry = spec.hook if isinstance(spec, TokensAt) else None
    clean = record_clean_run(model, tokens, mask, lambda n: n.endswith(FROZEN_INPUTS)
                             or n == entry)
    where = sites(spec, model, clean, tokens)
    captured: dict[str, Tensor] = {}
    before = [s.not_via for s in where if s.not_via]
    names = list(dict.fromkeys([s.hook for s in where] + before))
    first = resid_pre(0)  # the graph starts here: every later hook is differentiable

    def capture(name):
        def hook(x, hook):  # a new tensor, which the model goes on with (as a Bridge requires)
            captured[name] = y = x.detach().requires_grad_(True) if name == first else x.clone()
            return y
        return hook

    # Inputs of frozen MLPs are captured before the frozen hooks stash them; what the frozen
    # hooks replace (hook_z, the MLP activation) after.
    hooks = ([(n, capture(n)) for n in dict.fromkeys([first, *before])] + frozen_hooks(model, clean)
             + [(n, capture(n)) for n in dict.fromkeys(names) if n not in before and n != first]
             + [("unembed.hook_in", read_rows(at)), ("unembed.hook_out", capture("logits"))])
    with torch.enable_grad(), forward_as_recorded(model), model.hooks(fwd_hooks=hooks):
        model(tokens, attention_mask=mask)
        value = readout(captured.pop("logits").reshape(tokens.shape[0], -1))  # [batch, d_vocab]
        grads = dict(zip(names, torch.autograd.grad(value, [captured[n] for n in names],
                                                    retain_graph=True), strict=True))
        scores = []
        for s in where:
            g = grads[s.hook]
            if s.not_via is not None:  # total = direct + through `not_via` (all linear here)
                (via,) = torch.autograd.grad(captured[s.not_via], captured[s.hook], grads[s.not_via],
                                             retain_graph=True, allow_unused=True)
                g = g if via is None else g - via
            scores.append(s.score(g).detach())
    shares = einops.rearrange(torch.cat(scores, dim=1), "batch component -> component batch")
    return [label for s in where for label in s.labels], shares.contiguous()
