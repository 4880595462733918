"""Explain one prediction at every level and write it as a self-contained HTML report.

`explain(...)` runs DePass at the token level (from every layer's residual stream), on all heads,
on attention and MLP modules and on one layer's neurons, checks completeness, and, given a
corrupted prompt, runs activation patching at the same levels (`tl_depass.evaluate.compare` and
`transformer_lens.patching`). `write_html(...)` assembles the plotly figures of `tl_depass.app.viz`.

Why plotly and not CircuitsVis in the report: CircuitsVis' HTML (`str(...)`, and Jupyter's
display whenever the machine is online) imports its JavaScript from the unpkg CDN, so a saved
page is blank without network. Its offline form inlines a 1.3 MB bundle per picture. The report
must open offline (the browser test runs with no network), so it uses plotly figures with
plotly.js inlined once (about 4.6 MB per report). CircuitsVis stays available in Jupyter through
`dec.show(kind="circuitsvis")`.
"""

import html
import os
import tempfile
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import pandas as pd
import plotly.offline
import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from tl_depass.app import viz
from tl_depass.decompose import decompose
from tl_depass.errors import DepassError
from tl_depass.evaluate import compare
from tl_depass.levels import Heads, Modules, Neurons
from tl_depass.levels.components import TokensAt
from tl_depass.levels.label import Label
from tl_depass.tolerances import completeness_rtol

LEVELS = ("tokens", "heads", "modules", "neurons")


@dataclass
class Level:
    """DePass scores (each component's share of the metric) at one level, and, when a corrupted
    prompt was given, the activation patching effect of each component (metric with that clean
    activation restored in the corrupted run, minus the corrupted metric)."""

    labels: list[str]
    depass: Float[Tensor, " component"]
    patching: Float[Tensor, " component"] | None = None
    pearson: float = float("nan")
    spearman: float = float("nan")
    completeness: dict[str, float] = field(default_factory=dict)  # hook -> worst relative error
    note: str = ""  # what to keep in mind when reading the agreement
    components: list[Label] = field(default_factory=list)  # the structured labels of `labels`

    def agreement(self, note: bool = True) -> str:
        if self.patching is None:
            return "no activation patching (no corrupted prompt)"
        if self.pearson != self.pearson:
            return "n/a (fewer than 3 components)"
        return f"Pearson {self.pearson:.2f}, Spearman {self.spearman:.2f}" + (self.note if note else "")


@dataclass
class Explanation:
    model_name: str
    str_tokens: list[str]
    target: str
    wrong: str | None
    metric: float  # the clean metric: logit(target) [- logit(wrong)] at the last position
    rule: str
    tolerance: float
    corrupted: list[str] | None
    neuron_layer: int | None
    levels: dict[str, Level]
    tokens_by_layer: Float[Tensor, "layer pos"] | None  # each position's share entering each layer
    tokens_patching: Float[Tensor, "layer pos"] | None  # patching each position's resid_pre

    @property
    def metric_name(self) -> str:
        return f"logit({self.target!r})" + ("" if self.wrong is None else f" - logit({self.wrong!r})")


def correlations(x: Tensor, y: Tensor) -> tuple[float, float]:
    """Pearson and Spearman (Pearson of ranks) correlations; NaN below 3 points (meaningless)."""
    if x.numel() < 3:
        return float("nan"), float("nan")
    frame = pd.DataFrame({"x": x.double().flatten().tolist(), "y": y.double().flatten().tolist()})
    return float(frame.x.corr(frame.y)), float(frame.x.rank().corr(frame.y.rank()))


def worst_per_hook(dec) -> dict[str, float]:
    """Completeness error per hook, worst over groups (keys "hook [group]" collapse to "hook")."""
    out: dict[str, float] = {}
    for key, err in dec.completeness_error().items():
        hook = key.split(" [")[0]
        out[hook] = max(out.get(hook, 0.0), err)
    return out


def patch_effects(model, corrupted: Tensor, metric_rows: Callable[[Tensor], Tensor],
                  sites: list[tuple[str, Callable[[Tensor, Tensor], Tensor]]], clean_cache,
                  batch_size: int = 64) -> Float[Tensor, " site"]:
    """metric(corrupted run with one clean activation restored) - metric(corrupted), one site at a
    time; sites are (hook, patch(value, clean_value) -> patched value), run `batch_size` at once."""
    n = corrupted.shape[0]
    out = []
    with torch.no_grad():
        base = metric_rows(model(corrupted)).mean()
        for start in range(0, len(sites), batch_size):
            chunk = sites[start:start + batch_size]
            tokens = corrupted.repeat(len(chunk), 1)
            by_hook: dict[str, list] = {}  # one hook function (one copy) per hook point
            for i, (hook, patch) in enumerate(chunk):
                by_hook.setdefault(hook, []).append((slice(i * n, (i + 1) * n), patch))

            def fn(value, hook, todo, name):  # `name` as registered: a Bridge's hook.name may be an alias
                value = value.clone()
                for rows, patch in todo:
                    value[rows] = patch(value[rows], clean_cache[name])
                return value
            hooks = [(name, partial(fn, todo=todo, name=name)) for name, todo in by_hook.items()]
            values = metric_rows(model.run_with_hooks(tokens, fwd_hooks=hooks))
            out.append(values.reshape(len(chunk), n).mean(1) - base)
    return torch.cat(out)


@contextmanager
def patching_progress(show: bool):
    """transformer_lens.patching draws its own progress bars; hide them when `show` is False."""
    if show:
        yield
        return
    from transformer_lens import patching

    original = patching.tqdm
    patching.tqdm = lambda iterable, *args, **kwargs: iterable
    try:
        yield
    finally:
        patching.tqdm = original


def run_levels(run, bar, out: dict, neuron_layer: int | None) -> tuple:
    tokens_by_layer = tokens_patching = None
    for name in bar:
        bar.set_postfix_str(name)
        if name == "tokens":
            out[name], tokens_by_layer, tokens_patching = run.positions()
        elif name == "heads":
            out[name] = run.heads()
        elif name == "modules":
            out[name] = run.modules()
        else:
            if neuron_layer is None:  # the MLP with the largest share of the metric
                mlps = out.get("modules") or run.depass(Modules(), lambda label: label.endswith(" mlp"))
                shares = {label.layer: abs(score.item()) for label, score in
                          zip(mlps.components, mlps.depass, strict=True) if label.kind == "mlp"}
                neuron_layer = max(shares, key=shares.get)
            out[name] = run.neurons(neuron_layer)
    return tokens_by_layer, tokens_patching, neuron_layer


def explain(model, tokens: Tensor, target: int, wrong: int | None, corrupted: Tensor | None,
            rule: str = "softmax", neuron_layer: int | None = None, model_name: str = "model",
            levels: Sequence[str] = LEVELS, progress: bool = True, patch_limit: int = 512
            ) -> Explanation:
    """DePass at `levels` (default all; "neurons" only where the model has MLPs) for `target`
    (minus `wrong`) at the last position of `tokens` ([1, pos]); activation patching at the same
    levels when `corrupted` is given. `neuron_layer=None`: the layer whose MLP has the largest
    share of the metric. Patching at most `patch_limit` neurons (a random sample above that)."""
    cfg = model.cfg
    unknown = [name for name in levels if name not in LEVELS]
    if unknown:
        raise DepassError(f"unknown levels {unknown}; use some of {list(LEVELS)}")
    if cfg.attn_only:
        levels = [name for name in levels if name != "neurons"]
    run = Run(model, tokens, corrupted, target, wrong, rule, patch_limit)
    bar = tqdm(levels, desc="tl-depass", disable=not progress, leave=False)
    out: dict[str, Level] = {}
    with patching_progress(progress):
        tokens_by_layer, tokens_patching, neuron_layer = run_levels(run, bar, out, neuron_layer)
    str_tokens = list(model.to_str_tokens(tokens[0])) if model.tokenizer is not None else [
        f"[{int(t)}]" for t in tokens[0]]
    name = (lambda i: model.to_string([i])) if model.tokenizer is not None else (lambda i: f"[{i}]")
    with torch.no_grad():
        value = run.metric(model(tokens)).item()
    return Explanation(
        model_name, str_tokens, name(target), None if wrong is None else name(wrong), value, rule,
        completeness_rtol(cfg.dtype), None if corrupted is None else [name(int(t)) for t in corrupted[0]],
        neuron_layer if "neurons" in out else None, out, tokens_by_layer, tokens_patching)


class Run:
    """One prompt, one metric: the DePass scores and patching effects of each level."""

    def __init__(self, model, tokens, corrupted, target: int, wrong: int | None, rule: str,
                 patch_limit: int = 512):
        self.model, self.tokens, self.corrupted, self.rule = model, tokens, corrupted, rule
        self.patch_limit = patch_limit
        self.target, self.wrong = target, wrong
        self.cache = model.run_with_cache(tokens)[1] if corrupted is not None else None

    def metric_rows(self, logits: Tensor) -> Tensor:
        score = logits[:, -1, self.target]
        return score - logits[:, -1, self.wrong] if self.wrong is not None else score

    def metric(self, logits: Tensor) -> Tensor:
        return self.metric_rows(logits).mean()

    def corrupted_metric(self) -> Tensor:
        with torch.no_grad():
            return self.metric(self.model(self.corrupted))

    def depass(self, spec, parts: Callable[[str], bool]) -> Level:
        dec = decompose(self.model, self.tokens, spec, mlp_rule=self.rule)
        scores = compare.metric_scores(self.model, dec, self.metric)
        keep = [i for i, label in enumerate(dec.labels) if parts(label)]
        return Level([dec.labels[i] for i in keep], scores[keep], completeness=worst_per_hook(dec),
                     components=[dec.component_labels[i] for i in keep])

    def positions(self) -> tuple[Level, Tensor, Tensor | None]:
        """Each position's residual entering each layer (layer 0: the token level)."""
        n = self.tokens.shape[1]
        level = self.depass(TokensAt(0), lambda label: True)
        rows = [level.depass[:n]] + [self.depass(TokensAt(layer), lambda label: True).depass[:n]
                                     for layer in range(1, self.model.cfg.n_layers)]
        by_layer, patched = torch.stack(rows), None
        if self.corrupted is not None:
            found = compare.with_patching(self.model, self.tokens, self.corrupted, self.metric,
                                          "positions", self.rule)
            patched = (found.patching - self.corrupted_metric()).to(by_layer)
            # Restoring position p's embedding restores token p's part; the bias has no site.
            level.patching = torch.cat([patched[0], patched.new_zeros(len(level.labels) - n)])
            # Agreement over every (layer, position), as transformer_lens.patching lays it out.
            level.pearson, level.spearman = found.pearson, found.spearman
            differ = int((self.tokens != self.corrupted).sum())
            level.note = (f" (patching is 0 wherever the two prompts agree: {differ} of {n} "
                          "positions differ, so ranks are mostly ties)")
        return level, by_layer, patched

    def heads(self) -> Level:
        level = self.depass(Heads(), lambda label: viz.HEAD.fullmatch(label) is not None)
        if self.corrupted is not None:
            found = compare.with_patching(self.model, self.tokens, self.corrupted, self.metric,
                                          "heads", self.rule)
            _set_patching(level, (found.patching - self.corrupted_metric()).flatten())
        return level

    def modules(self) -> Level:
        level = self.depass(Modules(), lambda label: label.endswith((" attn", " mlp")))
        if self.corrupted is not None:
            sites = [(f"blocks.{label.layer}.hook_{label.kind}_out", _whole)
                     for label in level.components]
            _set_patching(level, self.patch(sites))
        return level

    def neurons(self, layer: int) -> Level:
        level = self.depass(Neurons(layer), lambda label: viz.NEURON.fullmatch(label) is not None)
        if self.corrupted is not None:
            # One patched forward per neuron: above `patch_limit` neurons, patch a random sample
            # (an unbiased estimate of the agreement over all of them, at a bounded cost).
            # The top 20 by DePass are patched too, for the tables; the sample alone is correlated.
            d_mlp, hook = self.model.cfg.d_mlp, f"blocks.{layer}.mlp.hook_post"
            chosen = list(range(d_mlp)) if d_mlp <= self.patch_limit else sorted(torch.randperm(
                d_mlp, generator=torch.Generator().manual_seed(0))[:self.patch_limit].tolist())
            top = level.depass.abs().argsort(descending=True)[:20].tolist()
            sites = sorted(set(chosen) | set(top))
            effect = self.patch([(hook, lambda v, c, i=i: _neuron(v, c, i)) for i in sites])
            level.patching = torch.full_like(level.depass, float("nan"))
            level.patching[sites] = effect.to(level.depass)
            level.pearson, level.spearman = correlations(level.depass[chosen], level.patching[chosen])
            if len(chosen) < d_mlp:
                level.note = f" (over {len(chosen)} of {d_mlp} neurons, sampled at random)"
        return level

    def patch(self, sites) -> Tensor:
        return patch_effects(self.model, self.corrupted, self.metric_rows, sites, self.cache)


def _whole(value: Tensor, clean: Tensor) -> Tensor:
    return clean.expand_as(value)


def _neuron(value: Tensor, clean: Tensor, i: int) -> Tensor:
    value[..., i] = clean[..., i]
    return value


def _set_patching(level: Level, effect: Tensor) -> None:
    level.patching = effect.to(level.depass)
    level.pearson, level.spearman = correlations(level.depass, level.patching)


# --- HTML ---

def figures(ex: Explanation) -> list[tuple[str, object]]:
    """(section title, plotly figure) in report order, for the levels that were computed."""
    what, lv = ex.metric_name, ex.levels
    out = []
    if "tokens" in lv:
        rows = ["tokens (embeddings)"] + [f"resid entering L{i}"
                                          for i in range(1, len(ex.tokens_by_layer))]
        out.append(("Token contributions", viz.token_heatmap(
            ex.tokens_by_layer, ex.str_tokens, rows, f"Each position's share of {what}")))
    if "heads" in lv:
        grid = lv["heads"].depass.reshape(-1, len([x for x in lv["heads"].components
                                                    if x.kind == "head" and x.layer == 0]))
        out.append(("Heads", viz.head_heatmap(grid, f"Each head's total effect on {what}")))
    if "modules" in lv:
        out.append(("Modules", viz.top_bar(lv["modules"].depass, lv["modules"].labels, 40,
                                           f"Attention and MLP blocks: share of {what}")))
    if "neurons" in lv:
        out.append(("Top neurons", viz.top_bar(lv["neurons"].depass, lv["neurons"].labels, 20,
                                               f"Layer {ex.neuron_layer} neurons: share of {what}")))
    out.append(("Completeness", viz.completeness_plot(
        {name: level.completeness for name, level in lv.items()}, ex.tolerance)))
    panels = {name: (level.depass, level.patching, level.labels, level.agreement(note=False))
              for name, level in lv.items() if level.patching is not None}
    if "tokens" in panels:  # every (layer, position), as in transformer_lens.patching
        labels = [f"entering L{i}, {p}: {t}" for i in range(len(ex.tokens_by_layer))
                  for p, t in enumerate(ex.str_tokens)]
        panels["tokens"] = (ex.tokens_by_layer.flatten(), ex.tokens_patching.flatten(), labels,
                            lv["tokens"].agreement(note=False))
    if panels:
        out.append(("DePass vs activation patching", viz.patching_scatter(panels)))
    return out


def top_table(level: Level, k: int = 10) -> list[tuple[str, float, float | None]]:
    order = level.depass.abs().argsort(descending=True)[:k].tolist()
    out = []
    for i in order:
        p = None if level.patching is None else level.patching[i].item()
        out.append((level.labels[i], level.depass[i].item(), None if p != p else p))  # NaN: not patched
    return out


def write_html(ex: Explanation, path: str | Path) -> Path:
    """Write the report; plotly.js is inlined, so the file opens with no network."""
    path = Path(path)
    figs = figures(ex)
    esc = html.escape
    parts = [f"<h1>DePass: why does <code>{esc(ex.model_name)}</code> predict "
             f"<code>{esc(ex.target)}</code>?</h1>",
             "<table class='facts'>",
             f"<tr><th>prompt</th><td><code>{esc(' '.join(ex.str_tokens))}</code></td></tr>",
             f"<tr><th>metric</th><td><code>{esc(ex.metric_name)}</code> at the last position = "
             f"{ex.metric:+.4f}</td></tr>",
             f"<tr><th>MLP rule</th><td>{esc(ex.rule)}</td></tr>",
             "<tr><th>corrupted prompt</th><td>" + (
                 f"<code>{esc(' '.join(ex.corrupted))}</code>" if ex.corrupted else
                 "none given: no activation patching comparison") + "</td></tr>"]
    worst = max(max(lv.completeness.values()) for lv in ex.levels.values())
    parts.append(f"<tr><th>completeness</th><td>worst relative error {worst:.1e} (tolerance "
                 f"{ex.tolerance:.0e}): {'OK' if worst <= ex.tolerance else 'FAILED'}</td></tr>")
    for name, lv in ex.levels.items():
        if lv.patching is not None:
            parts.append(f"<tr><th>agreement ({name})</th><td>{lv.agreement()}</td></tr>")
    parts.append("</table><div class='tables'>")
    for name, lv in ex.levels.items():
        rows = "".join(f"<tr><td>{esc(lab)}</td><td>{d:+.3f}</td><td>"
                       f"{'' if p is None else f'{p:+.3f}'}</td></tr>"
                       for lab, d, p in top_table(lv, 8))
        parts.append(f"<table class='top'><caption>top {name}</caption><tr><th>component</th>"
                     f"<th>DePass</th><th>patching</th></tr>{rows}</table>")
    parts.append("</div>")
    for title, fig in figs:
        parts.append(f"<h2>{esc(title)}</h2><div class='depass-figure'>"
                     + fig.to_html(full_html=False, include_plotlyjs=False) + "</div>")
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'>"
            f"<meta name='depass-figures' content='{len(figs)}'>"
            f"<title>DePass report: {esc(ex.model_name)}</title><style>{STYLE}</style>"
            f"<script type='text/javascript'>{plotly.offline.get_plotlyjs()}</script></head>"
            f"<body>{''.join(parts)}<p class='note'>{esc(NOTE)}</p></body></html>")
    write_atomic(path, page)
    return path


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to a temporary file in `path`'s folder, then rename it over `path`: a reader
    never sees half a report, and a symlink at `path` is refused, never written through."""
    if path.is_symlink():
        raise DepassError(f"{path} is a symlink: the report is never written through one")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's file is private; a report is an ordinary file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


NOTE = ("DePass splits the clean run's metric into each component's share with attention "
        "patterns, norm scales and MLP activations frozen; activation patching measures the effect "
        "of restoring one clean activation in the corrupted run with everything downstream free. "
        "They agree where effects are direct and roughly linear. Made by tl_depass.")
STYLE = """body{font-family:system-ui,sans-serif;margin:24px auto;padding:0 24px;max-width:1100px;
color:#222}
code{background:#f3f3f3;padding:1px 4px;border-radius:3px}
table.facts th{text-align:left;padding-right:16px;vertical-align:top}
.tables{display:flex;flex-wrap:wrap;gap:24px;margin:16px 0;align-items:flex-start}
table.top{border-collapse:collapse;font-size:13px}
table.top td,table.top th{border-bottom:1px solid #ddd;padding:2px 8px;text-align:right}
table.top td:first-child{text-align:left}caption{font-weight:600;text-align:left}
.note{color:#666;font-size:13px}"""
