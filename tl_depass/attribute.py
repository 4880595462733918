"""attribute(): each component's share of ONE readout, a logit or a logit difference.

With the linear `ratio` rule the decomposed pass is the linear part of the frozen model (patterns,
norm scales and MLP activation ratios held at their clean values), so a component's share of a
readout is exactly gradient x activation there: one forward and one backward through the frozen
model give, for every head, module or neuron of every layer at once, the numbers the folded
forward gives. `method="auto"` takes that path whenever it applies.

Results are component first, like `Decomposition.logit_attribution`: `Attribution.shares` is
`[component, batch]` (the old `Attribution.scores`, `[batch, component]`, is deprecated).
"""

import dataclasses
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import einops
import pandas as pd
import torch
from beartype import beartype
from jaxtyping import Float, Int, jaxtyped
from torch import Tensor

from tl_depass import memory
from tl_depass.arguments import Mask, Pos, Tokens, check_pos_embed, prepare_tokens
from tl_depass.decompose import decompose
from tl_depass.decomposition import Answer, answer_ids, check_wrong, readout_positions
from tl_depass.engine.backends import Model, check_model, forward_as_recorded
from tl_depass.engine.clean_run import CleanRun, record_clean_run
from tl_depass.engine.frozen import FROZEN_INPUTS, frozen_hooks
from tl_depass.engine.guard import serialised
from tl_depass.engine.hooks import attn_z, block_hook, resid_pre
from tl_depass.engine.replay import mlp_site
from tl_depass.engine.validate import check_layers, check_options, public, public_fields
from tl_depass.errors import DepassError
from tl_depass.levels import Heads, Modules, Neurons
from tl_depass.levels.components import PosEmbed, TokensAt, as_components, token_labels
from tl_depass.saving import load_result, save_result

Method = Literal["auto", "forward", "backward"]
UNNAMED = re.compile(r"(.* )?(rest|bias)")  # the rest and bias components are not returned


@public_fields
@dataclass(init=False)
class Attribution:
    """Each named component's share of one readout, per batch row: `shares[c, b]` is component
    `labels[c]`'s share of batch row b's logit (difference). Component first, as in
    `Decomposition.logit_attribution` (whose rows these are, without the rest and bias).

    Build one with `Attribution(labels, shares=..., method=...)`; the old positional form
    `Attribution(labels, scores, method)`, `scores` [batch, component], still works (deprecated)."""

    labels: list[str]  # the named components (no "rest", no "bias")
    shares: Float[Tensor, "component batch"]
    method: Literal["forward", "backward"]

    def __init__(self, labels: list[str], scores: Float[Tensor, "batch component"] | None = None,
                 method: Literal["forward", "backward"] | None = None, *,
                 shares: Float[Tensor, "component batch"] | None = None) -> None:
        if (scores is None) == (shares is None) or method is None:
            raise DepassError("Attribution needs labels, shares= ([component, batch]) and method= "
                              "('forward' or 'backward')")
        if scores is not None:
            warnings.warn("Attribution(labels, scores, method) with scores [batch, component] is "
                          "deprecated: pass shares= [component, batch] (scores.T)",
                          DeprecationWarning, stacklevel=4)  # the caller, past public's checks
            shares = scores.T
        if shares.shape[0] != len(labels):
            raise DepassError(
                f"Attribution: shares has shape {tuple(shares.shape)} for {len(labels)} labels; "
                f"expected [component={len(labels)}, batch] (component first: a [batch, component] "
                "tensor, the old `scores`, needs .T)")
        self.labels, self.shares, self.method = labels, shares, method

    @property
    def scores(self) -> Float[Tensor, "batch component"]:
        """Deprecated: `shares.T`, the old [batch, component] order; use `shares`."""
        warnings.warn("Attribution.scores ([batch, component]) is deprecated: use "
                      "Attribution.shares, [component, batch] (component first, like "
                      "Decomposition.logit_attribution); scores is shares.T",
                      DeprecationWarning, stacklevel=2)
        return self.shares.T

    @public
    def mean(self, weights: Float[Tensor, " batch"] | None = None) -> Float[Tensor, " component"]:
        """Each component's share averaged over the batch rows (weighted by `weights`, one per
        row, e.g. 0/1 to average over a subset)."""
        batch = self.shares.shape[1]
        if weights is None:
            return self.shares.mean(1)
        if weights.shape[0] != batch:
            raise DepassError(f"Attribution.mean: weights has shape {tuple(weights.shape)}; expected "
                              f"[batch={batch}], one weight per batch row")
        if not weights.sum() > 0:
            raise DepassError("Attribution.mean: weights sum to 0 (or are not finite): give some "
                              "row a positive weight")
        weights = weights.to(self.shares)
        return self.shares @ weights / weights.sum()

    def to_frame(self) -> pd.DataFrame:
        """A tidy table (batch, component, score), one row per batch row and component."""
        return pd.DataFrame([(b, label, float(self.shares[c, b])) for b in range(self.shares.shape[1])
                             for c, label in enumerate(self.labels)],
                            columns=["batch", "component", "score"])

    def save(self, path: str | Path, overwrite: bool = False) -> Path:
        """Write this attribution to the directory `path` (safetensors and JSON, no pickle);
        an existing saved result is replaced only with `overwrite=True`."""
        # the file keeps the [batch, component] "scores" of earlier versions
        return save_result(path, "Attribution", {"labels": self.labels, "method": self.method},
                           {"scores": self.shares.T}, overwrite)

    @classmethod
    def load(cls, path: str | Path, device: torch.device | str = "cpu") -> "Attribution":
        """An attribution saved with `.save(path)`."""
        meta, tensors = load_result(path, "Attribution", ("labels", "method"))
        shares = einops.rearrange(tensors["scores"], "batch component -> component batch")
        return cls(meta["labels"], shares=shares.contiguous(), method=meta["method"]).to(device)

    def to(self, device: torch.device | str) -> "Attribution":
        """A copy with the shares on `device` (shared if already there, as with `Tensor.to`)."""
        return dataclasses.replace(self, labels=list(self.labels), shares=self.shares.to(device))

    def cpu(self) -> "Attribution":
        """A copy with the shares on the CPU."""
        return self.to("cpu")


@dataclass
class Site:
    hook: str  # where the gradient is taken
    score: Callable[[Tensor], Tensor]  # gradient there -> [batch, component]
    labels: list[str]
    not_via: str | None = None  # a hook whose path to the readout is not this component's


def sites(spec, model: Model, clean: CleanRun, tokens: Int[Tensor, "batch pos"]) -> list[Site]:
    """Where each component of `spec` enters, and how gradient x activation splits into them."""
    if isinstance(spec, TokensAt):
        x = clean[spec.hook]
        prefix = f"L{spec.layer} " if spec.layer else ""
        return [Site(spec.hook, lambda g: (g * x).sum(-1), token_labels(model, tokens, prefix))]
    out = []
    if isinstance(spec, (Heads, Modules)):
        for layer in check_layers(model, spec.layers, type(spec).__name__):
            z = clean[attn_z(layer)]  # [batch pos head_index d_head]
            if isinstance(spec, Heads):
                out.append(Site(attn_z(layer), lambda g, z=z: (g * z).sum((1, 3)),
                                [f"L{layer}H{h}" for h in range(z.shape[2])]))
                continue
            if model.cfg.attn_only:
                out.append(Site(attn_z(layer), lambda g, z=z: (g * z).flatten(1).sum(1, True),
                                [f"L{layer} attn"]))
            else:  # the layer's MLP output is a component of its own: not the attention's share
                out.append(Site(attn_z(layer), lambda g, z=z: (g * z).flatten(1).sum(1, True),
                                [f"L{layer} attn"], not_via=block_hook(layer, "mlp.hook_pre")))
                site = mlp_site(model, clean, block_hook(layer, "mlp"))
                out.append(Site(site.act_hook, lambda g, a=site.facts.act: (g * a).flatten(1).sum(1, True),
                                [f"L{layer} mlp"]))
        return out
    if isinstance(spec, Neurons):
        (layer,) = check_layers(model, [spec.layer], "Neurons")
        site = mlp_site(model, clean, block_hook(layer, "mlp"))
        act = site.facts.act
        chosen = list(range(act.shape[-1])) if spec.neurons is None else list(spec.neurons)
        return [Site(site.act_hook, lambda g: (g * act).sum(1)[:, chosen],
                     [f"L{layer}N{i}" for i in chosen])]
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
             ) -> tuple[list[str], Float[Tensor, "component batch"]]:
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


@public
@serialised
@jaxtyped(typechecker=beartype)
def attribute(
    model: Model,
    tokens: Tokens,
    components: object = "tokens",
    *,
    answer: Answer,
    wrong: Answer | None = None,
    pos: Pos = -1,
    mlp_rule: str = "softmax",
    temperature: float = 0.1,
    attention_mask: Mask = None,
    pos_embed: PosEmbed = "with_token",
    method: Method | str = "auto",  # str: a clear error below, not a type-check failure
    chunk_size: int | None = None,
    max_memory: int | None = None,
) -> Attribution:
    """Each component's share of `logit[answer] - logit[wrong]` (pre-softcap) at `pos`, per
    batch row: the rows of `decompose(...).logit_attribution(answer, wrong, pos)`, without the
    rest and bias components, as `Attribution.shares` [component, batch]. `method="backward"`
    (what "auto" picks for `mlp_rule="ratio"`) computes them with one forward and one backward
    through the frozen model.

    Shapes (checked): `tokens` [batch, pos] (or [pos], or text), `attention_mask` [batch, pos],
    `pos` an int or one position per batch row ([batch] or [1])."""
    check_model(model)
    check_options(model, mlp_rule, temperature, chunk_size)
    if method not in ("auto", "forward", "backward"):
        raise DepassError(f"unknown method {method!r}; use 'auto', 'forward' or 'backward'")
    if method == "backward" and mlp_rule != "ratio":
        raise DepassError(f"the backward path is exact only for the linear rule; mlp_rule={mlp_rule!r} "
                          "needs method='forward' (or use mlp_rule='ratio')")
    spec = as_components(components, model)
    supported = isinstance(spec, (Heads, Modules, Neurons)) or (
        isinstance(spec, TokensAt) and pos_embed == "with_token")
    if method == "backward" and not supported:
        raise DepassError(
            "the backward path handles tokens / TokensAt (pos_embed='with_token'), Heads, Modules "
            f"and Neurons, not {spec!r}: use method='forward'")
    if not (supported and mlp_rule == "ratio" and method != "forward"):
        dec = decompose(model, tokens, spec, mlp_rule=mlp_rule, temperature=temperature,
                        attention_mask=attention_mask, pos_embed=pos_embed, keep=[],
                        chunk_size=chunk_size, max_memory=max_memory,
                        logits=read_positions(model, tokens, attention_mask, pos))
        score = dec.logit_attribution(answer, wrong, pos)  # [component, batch]
        named = [c for c, label in enumerate(dec.labels) if not UNNAMED.fullmatch(label)]
        return Attribution([dec.labels[c] for c in named], shares=score[named], method="forward")
    check_pos_embed(spec, pos_embed)
    tokens, mask = prepare_tokens(model, tokens, attention_mask)
    batch, rows = tokens.shape[0], torch.arange(tokens.shape[0])
    at = readout_positions(tokens, mask, pos)
    right = answer_ids(model, answer, batch, model.cfg.d_vocab, tokens.device)
    other = None if wrong is None else check_wrong(
        right, answer_ids(model, wrong, batch, model.cfg.d_vocab, tokens.device))

    def readout(logits):  # [batch, d_vocab]: the read position of each row
        value = logits[rows, right]
        return (value if other is None else value - logits[rows, other]).sum()

    memory.check_backward(model, tokens, max_memory)
    labels, shares = backward(model, tokens, mask, spec, readout, at)
    if mask is not None and isinstance(spec, TokensAt):  # component = position here
        shares = shares.masked_fill(mask.T == 0, 0)
    return Attribution(labels, shares=shares, method="backward")


def read_positions(model: Model, tokens: Tokens, attention_mask: Mask, pos: Pos
                   ) -> Int[Tensor, " batch"]:
    """The one position per row that `attribute` reads (checked as the readout checks it), so
    that decompose unembeds only those."""
    tokens, mask = prepare_tokens(model, tokens, attention_mask)
    return readout_positions(tokens, mask, pos)
