"""attribute(): each component's share of ONE readout, a logit or a logit difference.

With the linear `ratio` rule the decomposed pass is the linear part of the frozen model (patterns,
norm scales and MLP activation ratios held at their clean values), so a component's share of a
readout is exactly gradient x activation there: one forward and one backward through the frozen
model give, for every head, module or neuron of every layer at once, the numbers the folded
forward gives. `method="auto"` takes that path whenever it applies.

Results are component first, like `Decomposition.logit_attribution`: `Attribution.shares` is
`[component, batch]` (the old `Attribution.scores`, `[batch, component]`, is deprecated).
"""

import warnings
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
from tl_depass.backward import backward
from tl_depass.decompose import decompose
from tl_depass.decomposition import Answer, answer_ids, check_wrong, readout_positions
from tl_depass.engine.backends import Model, check_model
from tl_depass.engine.guard import serialised
from tl_depass.engine.validate import check_options, public, public_fields
from tl_depass.errors import DepassError
from tl_depass.levels import Heads, Label, Modules, Neurons
from tl_depass.levels.components import as_components
from tl_depass.levels.tokens import PosEmbed, TokensAt
from tl_depass.saving import label_records, labels_from_records, load_result, save_result

Method = Literal["auto", "forward", "backward"]


@public_fields
@dataclass(init=False)
class Attribution:
    """Each named component's share of one readout, per batch row: `shares[c, b]` is component
    `labels[c]`'s share of batch row b's logit (difference). Component first, as in
    `Decomposition.logit_attribution` (whose rows these are, without the rest and bias).

    `attribute` also gives what is no named component's own share: `remainder_labels` /
    `remainder_shares`, each group's rest (kind "rest"; the token level has none) and bias (kind
    "bias"), exactly as `decompose` has them, and `metric` [batch], the clean readout (logit
    difference, pre-softcap) that each group's shares, rest and bias sum to. An Attribution built
    by hand or loaded from an older file may lack them (empty, None).

    Build one with `Attribution(labels, shares=..., method=...)`; the old positional form
    `Attribution(labels, scores, method)`, `scores` [batch, component], still works (deprecated)."""

    labels: list[str]  # the named components (no "rest", no "bias")
    shares: Float[Tensor, "component batch"]
    method: Literal["forward", "backward"]
    component_labels: list[Label]  # the structured labels of `labels` (kind, layer, index, group)
    metric: Float[Tensor, " batch"] | None  # the clean readout
    remainder_labels: list[Label]  # each group's rest and bias
    remainder_shares: Float[Tensor, "remainder batch"] | None

    def __init__(self, labels: list[str], scores: Float[Tensor, "batch component"] | None = None,
                 method: Literal["forward", "backward"] | None = None, *,
                 shares: Float[Tensor, "component batch"] | None = None,
                 component_labels: list[Label] | None = None,
                 metric: Float[Tensor, " batch"] | None = None,
                 remainder_labels: list[Label] | None = None,
                 remainder_shares: Float[Tensor, "remainder batch"] | None = None) -> None:
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
        if component_labels is None:  # built by hand, or saved before structured labels
            component_labels = [Label(name, "unknown") for name in labels]
        if [x.name for x in component_labels] != list(labels):
            raise DepassError("Attribution: component_labels must name the same components as "
                              "labels, in the same order")
        remainder_labels = list(remainder_labels or [])
        if len(remainder_labels) != (0 if remainder_shares is None else remainder_shares.shape[0]):
            raise DepassError("Attribution: remainder_shares needs one row per remainder_labels "
                              "label (each group's rest and bias), or neither")
        self.labels, self.shares, self.method = labels, shares, method
        self.component_labels = list(component_labels)
        self.metric, self.remainder_labels = metric, remainder_labels
        self.remainder_shares = remainder_shares

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

    def with_rest_and_bias(self) -> tuple[list[Label], Float[Tensor, "component batch"]]:
        """Every component in decompose's order (per group: its rest, its named components, its
        bias), with their shares [component, batch]: per group they sum to `metric`."""
        if self.remainder_shares is None:
            raise DepassError("this Attribution has no rest and bias shares (built by hand or "
                              "loaded from an older file): run tl_depass.attribute again")
        labels = self.component_labels + self.remainder_labels
        rank = {"rest": 0, "bias": 2}
        order = sorted(range(len(labels)), key=lambda c: (labels[c].group, rank.get(labels[c].kind, 1)))
        shares = torch.cat([self.shares, self.remainder_shares.to(self.shares)])
        return [labels[c] for c in order], shares[order]

    def to_frame(self) -> pd.DataFrame:
        """A tidy table (batch, component, score), one row per batch row and component."""
        return pd.DataFrame([(b, label, float(self.shares[c, b])) for b in range(self.shares.shape[1])
                             for c, label in enumerate(self.labels)],
                            columns=["batch", "component", "score"])

    def save(self, path: str | Path, overwrite: bool = False) -> Path:
        """Write this attribution to the directory `path` (safetensors and JSON, no pickle);
        an existing saved result is replaced only with `overwrite=True`."""
        # the file keeps the [batch, component] "scores" of earlier versions
        return save_result(path, "Attribution", {
            "labels": self.labels, "method": self.method,
            "component_labels": label_records(self.component_labels),
            "remainder_labels": label_records(self.remainder_labels)},
            {"scores": self.shares.T, "metric": self.metric, "remainder": self.remainder_shares},
            overwrite)

    @classmethod
    def load(cls, path: str | Path, device: torch.device | str = "cpu") -> "Attribution":
        """An attribution saved with `.save(path)`."""
        meta, tensors = load_result(path, "Attribution", ("labels", "method"))
        shares = einops.rearrange(tensors["scores"], "batch component -> component batch")
        rest = labels_from_records({"component_labels": meta.get("remainder_labels", [])})
        return cls(meta["labels"], shares=shares.contiguous(), method=meta["method"],
                   component_labels=labels_from_records(meta), metric=tensors.get("metric"),
                   remainder_labels=rest, remainder_shares=tensors.get("remainder")).to(device)

    def to(self, device: torch.device | str) -> "Attribution":
        """A copy with the shares on `device` (shared if already there, as with `Tensor.to`)."""
        def moved(x):
            return None if x is None else x.to(device)
        return Attribution(list(self.labels), shares=self.shares.to(device), method=self.method,
                           component_labels=self.component_labels, metric=moved(self.metric),
                           remainder_labels=self.remainder_labels,
                           remainder_shares=moved(self.remainder_shares))

    def cpu(self) -> "Attribution":
        """A copy with the shares on the CPU."""
        return self.to("cpu")


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
    rest and bias components, as `Attribution.shares` [component, batch] (the rest and bias in
    `remainder_shares`, the clean readout in `metric`). `method="backward"` (what "auto" picks
    for `mlp_rule="ratio"`) computes them with one forward and one backward through the frozen
    model.

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
        named = [c for c, label in enumerate(dec.component_labels)
                 if label.kind not in ("rest", "bias")]  # not a component's own share
        others = [c for c in range(len(dec.labels)) if c not in set(named)]
        metric = clean_readout(model, dec.clean["logits"], answer, wrong)
        return Attribution([dec.labels[c] for c in named], shares=score[named], method="forward",
                           component_labels=[dec.component_labels[c] for c in named],
                           metric=metric, remainder_labels=[dec.component_labels[c] for c in others],
                           remainder_shares=score[others])
    check_pos_embed(spec, pos_embed)
    tokens, mask = prepare_tokens(model, tokens, attention_mask)
    batch = tokens.shape[0]
    at = readout_positions(tokens, mask, pos)
    right = answer_ids(model, answer, batch, model.cfg.d_vocab, tokens.device)
    if wrong is not None:  # bad answers are refused here, before any forward
        check_wrong(right, answer_ids(model, wrong, batch, model.cfg.d_vocab, tokens.device))

    def readout(logits):  # [batch, d_vocab] (on the last layer's device): the read position's
        return clean_readout(model, logits, answer, wrong)

    memory.check_backward(model, tokens, max_memory)
    got = backward(model, tokens, mask, spec, readout, at)
    return Attribution([x.name for x in got.labels], shares=got.shares, method="backward",
                       component_labels=got.labels, metric=got.metric,
                       remainder_labels=got.remainder_labels, remainder_shares=got.remainder)


def clean_readout(model: Model, logits: Float[Tensor, "batch d_vocab"], answer: Answer,
                  wrong: Answer | None) -> Float[Tensor, " batch"]:
    """`logits[answer] - logits[wrong]` per row (the forward path's clean readout)."""
    batch, d_vocab, device = logits.shape[0], logits.shape[-1], logits.device
    rows = torch.arange(batch, device=device)
    value = logits[rows, answer_ids(model, answer, batch, d_vocab, device)]
    if wrong is None:
        return value
    return value - logits[rows, answer_ids(model, wrong, batch, d_vocab, device)]


def read_positions(model: Model, tokens: Tokens, attention_mask: Mask, pos: Pos
                   ) -> Int[Tensor, " batch"]:
    """The one position per row that `attribute` reads (checked as the readout checks it), so
    that decompose unembeds only those."""
    tokens, mask = prepare_tokens(model, tokens, attention_mask)
    return readout_positions(tokens, mask, pos)
