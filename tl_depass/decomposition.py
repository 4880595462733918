"""The result of `decompose`: per-component activations, component axis first."""

import copy
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from tl_depass.engine.backends import Model, canonical_names
from tl_depass.engine.validate import check_finite, public
from tl_depass.errors import DepassError, NotKeptError
from tl_depass.levels.label import Label
from tl_depass.readouts import Answer, answer_ids, check_wrong, readout_positions, unit_grid
from tl_depass.saving import (
    SavedModel,
    label_records,
    labels_from_records,
    load_result,
    model_facts,
    save_result,
)
from tl_depass.tolerances import relative_error

__all__ = ["Answer", "Decomposition", "answer_ids", "check_wrong", "readout_positions"]


class Decomposition:
    """Each component's additive share of every kept activation and of the logits.

    `dec[hook]` is `[component, batch, pos, ...]` (TransformerLens axes after the component axis);
    the last component is always "bias". `dec[hook].sum(0)` equals the clean activation.
    `dec.labels` are the components' display strings ("L3H7"), `dec.component_labels` the same
    components as structured labels (`Label`: name, kind, layer, index, group).
    `dec.save(path)` writes it to a directory; `Decomposition.load(path)` reads it back without
    the model (`dec.model` is then a `SavedModel`: its facts, no weights, no tokenizer).
    """

    def __init__(self, model: Model | SavedModel, labels: list[Label] | list[str],
                 results: dict[str, Tensor], clean: dict[str, Tensor],
                 tokens: Int[Tensor, "batch pos"], attention_mask: Tensor | None,
                 clean_logits: Tensor, n_groups: int = 1, logits: str | None = "all",
                 logit_positions: Tensor | None = None):
        size = len(labels) // n_groups
        #: One structured label per component (display strings only: kind "unknown").
        self.component_labels = [x if isinstance(x, Label) else Label(x, "unknown", group=c // size)
                                 for c, x in enumerate(labels)]
        self.labels = [x.name for x in self.component_labels]
        self.model, self.results, self.clean = model, results, clean
        #: decompose's `logits=`: "all", "last", "positions" (an int or tensor) or None; with
        #: "last"/"positions", `logit_positions` [batch] holds each row's kept position.
        self.logits_kept, self.logit_positions = logits, logit_positions
        self.tokens, self.attention_mask, self.clean_logits = tokens, attention_mask, clean_logits
        #: One slice of the component axis per group (one per layer for Heads and Modules); each
        #: group's shares sum to the clean activation, and each group ends with its own bias.
        self.groups = [slice(g * size, (g + 1) * size) for g in range(n_groups)]
        #: On a loaded result saved with a tokenizer: each batch row's token strings.
        self.str_tokens: list[list[str]] | None = None

    def __getitem__(self, name: str) -> Tensor:
        if name not in self.results and name != "logits":  # a Bridge's raw name or alias
            aliases = (self.model.aliases if isinstance(self.model, SavedModel)
                       else canonical_names(self.model))
            name = aliases.get(name, name)
        if name not in self.results:
            kept = sorted(self.results)
            raise NotKeptError(
                f"{name!r} was not kept; kept: {kept[:4]}{' ...' if len(kept) > 4 else ''}. Pass "
                f"keep=[..., {name!r}] to tl_depass.decompose"
            )
        return self.results[name]

    def __contains__(self, name: str) -> bool:
        return name in self.results

    @property
    def logits(self) -> Float[Tensor, "component batch *pos d_vocab"]:
        """Per-component logits (before any final logit softcap): [component, batch, pos,
        d_vocab], or [component, batch, d_vocab] at `logit_positions` (decompose(logits=...))."""
        if "logits" not in self.results:
            raise DepassError("decompose ran with logits=None: no logits were kept; pass "
                              "logits='all', 'last' or a position to tl_depass.decompose")
        return self.results["logits"]

    def _logits_at(self, pos: int | Tensor, batch: int | None = None) -> Tensor | None:
        """Where to index the all-position logits for the readout at `pos`, or None when the
        kept per-row logits are those at `pos` (else DepassError). `batch`: one row, unmasked."""
        self.logits  # noqa: B018  (raises when no logits were kept)
        tokens, mask = self.tokens, self.attention_mask
        if batch is not None:
            tokens, mask = tokens[batch:batch + 1], None
        if self.logit_positions is None:
            return readout_positions(tokens, mask, pos)
        if self.logits_kept == "last" and isinstance(pos, int) and pos == -1:
            return None
        kept = self.logit_positions if batch is None else self.logit_positions[batch:batch + 1]
        at = readout_positions(tokens, mask, pos)
        if not torch.equal(at, kept.to(at.device)):
            raise DepassError(f"the logits at position {at.tolist()} were not kept (decompose kept "
                              f"position {kept.tolist()}): pass logits='all' or logits=<pos> "
                              "to tl_depass.decompose, or read at the kept position")
        return None

    def _clean_at(self, pos: int | Tensor) -> Float[Tensor, "batch d_vocab"]:
        at = self._logits_at(pos)
        clean = self.clean["logits"]
        return clean if at is None else clean[torch.arange(self.tokens.shape[0]), at]

    def __repr__(self) -> str:
        return (f"Decomposition({len(self.labels)} components, batch {self.tokens.shape[0]}, "
                f"pos {self.tokens.shape[1]}, kept {len(self.results)} hooks)")

    # --- saving ---
    def save(self, path: str | Path, overwrite: bool = False) -> Path:
        """Write this decomposition to the directory `path` (safetensors and JSON, no pickle);
        an existing saved result is replaced only with `overwrite=True`."""
        model = self.model
        if isinstance(model, SavedModel):
            facts, aliases = vars(model.cfg), model.aliases
        else:
            facts = model_facts(model)
            aliases = {k: v for k, v in canonical_names(model).items()
                       if v in self.results and k != v}
        tokenizer = getattr(model, "tokenizer", None)
        record = {
            "labels": self.labels, "component_labels": label_records(self.component_labels),
            "n_groups": len(self.groups), "kept": list(self.results),
            "clean": list(self.clean), "model": facts, "aliases": aliases,
            "logits_kept": self.logits_kept,
            "str_tokens": (self.str_tokens if tokenizer is None else
                           [list(model.to_str_tokens(row)) for row in self.tokens]),
        }
        tensors = {"tokens": self.tokens, "attention_mask": self.attention_mask,
                   "clean_logits": self.clean_logits,
                   **{f"results/{k}": v for k, v in self.results.items()},
                   **{f"clean/{k}": v for k, v in self.clean.items()}}
        if self.logit_positions is not None:  # logits="all" files stay as they were
            tensors["logit_positions"] = self.logit_positions
        return save_result(path, "Decomposition", record, tensors, overwrite)

    @classmethod
    def load(cls, path: str | Path, device: torch.device | str = "cpu") -> "Decomposition":
        """A decomposition saved with `.save(path)`, without its model: every readout that needs
        only saved data works (answers as token ids; `top_tokens` names tokens by id)."""
        meta, t = load_result(path, "Decomposition",
                              ("labels", "n_groups", "kept", "clean", "model", "aliases"))
        model = SavedModel(SimpleNamespace(**meta["model"]), Path(path), meta["aliases"])
        dec = cls(model, labels_from_records(meta), {k: t[f"results/{k}"] for k in meta["kept"]},
                  {k: t[f"clean/{k}"] for k in meta["clean"]}, t["tokens"], t["attention_mask"],
                  t["clean_logits"], n_groups=meta["n_groups"],
                  logits=meta.get("logits_kept", "all"),  # files saved before logits= existed
                  logit_positions=t.get("logit_positions"))
        dec.str_tokens = meta.get("str_tokens")
        return dec.to(device)

    def to(self, device: torch.device | str) -> "Decomposition":
        """A copy with every tensor on `device` (tensors already there are shared, as with
        `Tensor.to`); the model is not moved."""
        out = copy.copy(self)
        out.results = {k: v.to(device) for k, v in self.results.items()}
        out.clean = {k: v.to(device) for k, v in self.clean.items()}
        out.tokens, out.clean_logits = self.tokens.to(device), self.clean_logits.to(device)
        out.attention_mask = None if self.attention_mask is None else self.attention_mask.to(device)
        out.logit_positions = (None if self.logit_positions is None
                               else self.logit_positions.to(device))
        out.labels, out.groups = list(self.labels), list(self.groups)
        out.component_labels = list(self.component_labels)
        return out

    def cpu(self) -> "Decomposition":
        """A copy with every tensor on the CPU."""
        return self.to("cpu")

    # --- readouts ---
    def _tokens(self, answer: Answer) -> Int[Tensor, " batch"]:
        if isinstance(self.model, SavedModel) and (
                isinstance(answer, str) or isinstance(answer, list)
                and any(isinstance(a, str) for a in answer)):
            raise DepassError(f"this Decomposition was loaded from {self.model.path} without its "
                              f"model or tokenizer: pass token ids, not strings ({answer!r:.60})")
        return answer_ids(self.model, answer, self.tokens.shape[0], self.logits.shape[-1],
                          self.tokens.device)

    @public
    def logit_attribution(self, answer: Answer, wrong: Answer | None = None,
                          pos: int | Tensor = -1) -> Float[Tensor, "component batch"]:
        """Each component's contribution to the answer's logit (minus the wrong answer's) at
        `pos` (one int, or one position per batch row)."""
        rows, where = torch.arange(self.tokens.shape[0]), self._logits_at(pos)
        at = self.logits if where is None else self.logits[:, rows, where]  # [component, batch, d_vocab]
        right = self._tokens(answer)
        score = at[:, rows, right]
        if wrong is not None:
            score = score - at[:, rows, check_wrong(right, self._tokens(wrong))]
        return score

    @public
    def index(self, label: str) -> int:
        """The component axis index of `label`."""
        if label not in self.labels:
            close = [x for x in self.labels if label.lower() in x.lower()][:5]
            raise DepassError(f"no component labelled {label!r}; similar: {close}")
        return self.labels.index(label)

    def completeness_error(self) -> dict[str, float]:
        """max|sum over components - clean| / max|clean|, per kept hook (and per group, as
        "hook [group's first label]", when there are several groups)."""
        out = {}
        for name, value in self.results.items():
            for g in self.groups:
                key = name if len(self.groups) == 1 else f"{name} [{self.labels[g.start]}]"
                out[key] = relative_error(value[g].sum(0), self.clean[name])
        return out

    @public
    def head_scores(self, answer: Answer, wrong: Answer | None = None,
                    pos: int | Tensor = -1) -> Float[Tensor, "batch layer head_index"]:
        """Each head's total effect on the logit (difference), shaped like TransformerLens'
        head patching results (NaN for layers not decomposed). Needs components=Heads(...)."""
        cfg = self.model.cfg
        return unit_grid(self.component_labels, self.logit_attribution(answer, wrong, pos), "head",
                         (cfg.n_layers, cfg.n_heads))

    @public
    def neuron_scores(self, answer: Answer, wrong: Answer | None = None,
                      pos: int | Tensor = -1) -> Float[Tensor, "batch layer d_mlp"]:
        """Each neuron's total effect (NaN where not decomposed). Needs components=Neurons(...)."""
        cfg = self.model.cfg
        return unit_grid(self.component_labels, self.logit_attribution(answer, wrong, pos), "neuron",
                         (cfg.n_layers, cfg.d_mlp))

    @public
    def project(self, hook: str, direction: Float[Tensor, " d"], bias: float = 0.0
                ) -> Float[Tensor, "component batch pos"]:
        """A linear readout (a probe logit `direction . x + bias`) per component at `hook`;
        the probe bias goes to each group's bias component."""
        value = self[hook]
        if direction.shape != value.shape[-1:]:
            raise DepassError(f"project: direction has shape {tuple(direction.shape)}; {hook} has "
                              f"d={value.shape[-1]}: pass a direction of shape [{value.shape[-1]}]")
        check_finite(direction.double(), "project: the direction")
        out = value @ direction.to(value)
        for g in self.groups:
            out[g.stop - 1] += bias
        return out

    @public
    def top_tokens(self, component: int | str, k: int = 10, batch: int = 0,
                   pos: int = -1) -> list[tuple[str, float]]:
        """The vocabulary entries component `component` pushes up most at (batch, pos)."""
        c = self.index(component) if isinstance(component, str) else component
        n, rows, vocab = len(self.labels), self.tokens.shape[0], self.logits.shape[-1]
        if not 0 <= c < n:
            raise DepassError(f"top_tokens: component {c} is not in 0..{n - 1}; or pass a label")
        if not 0 <= batch < rows:
            raise DepassError(f"top_tokens: batch {batch} is not a row of this batch (0..{rows - 1})")
        if not 1 <= k <= vocab:
            raise DepassError(f"top_tokens: k={k} must be in 1..d_vocab={vocab}")
        at = self._logits_at(pos, batch)
        values, ids = (self.logits[c, batch] if at is None else self.logits[c, batch, at[0]]).topk(k)
        names = (self.model.to_str_tokens(ids) if self.model.tokenizer is not None
                 else [f"[{i}]" for i in ids.tolist()])
        return list(zip(names, values.tolist(), strict=True))

    @public
    def to_frame(self, answer: Answer | None = None, wrong: Answer | None = None,
                 pos: int | Tensor = -1) -> pd.DataFrame:
        """A tidy table (component, kind, layer, index, batch, score) of logit attributions; by
        default for the model's top prediction at `pos`. kind, layer and index come from the
        structured labels (`dec.component_labels`; layer and index are <NA> where a kind has
        none)."""
        if answer is None:
            answer = self._clean_at(pos).argmax(-1)
        score = self.logit_attribution(answer, wrong, pos)
        frame = pd.DataFrame([
            {"component": label.name, "kind": label.kind, "layer": label.layer,
             "index": label.index, "batch": b, "score": score[c, b].item()}
            for c, label in enumerate(self.component_labels) for b in range(score.shape[1])
        ], columns=["component", "kind", "layer", "index", "batch", "score"])
        return frame.astype({"layer": "Int64", "index": "Int64"})

    def show(self, answer: Answer | None = None, wrong: Answer | None = None, pos: int = -1,
             batch: int = 0, k: int = 20, kind: str = "plotly"):
        """A picture of the logit attribution that fits the level (tokens: a heatmap over
        positions; heads: layer x head; others: the top k components), displayable in Jupyter.
        `kind="circuitsvis"`: CircuitsVis' colored tokens (token level). See `tl_depass.app.viz`."""
        from tl_depass.app.viz import show

        return show(self, answer, wrong, pos=pos, batch=batch, k=k, kind=kind)
