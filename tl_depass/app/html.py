"""The HTML page of an `Explanation` (computed by `tl_depass.app.explain`): facts, top tables and
plotly figures (`tl_depass.app.viz`), with plotly.js inlined so that the file opens offline.

Rendering reads only the Explanation, never a model: a saved Explanation renders again to the
same page (figure ids are fixed, not random).

Why plotly and not CircuitsVis in the report: CircuitsVis' HTML (`str(...)`, and Jupyter's
display whenever the machine is online) imports its JavaScript from the unpkg CDN, so a saved
page is blank without network. Its offline form inlines a 1.3 MB bundle per picture. The report
must open offline (the browser test runs with no network), so it uses plotly figures with
plotly.js inlined once (about 4.6 MB per report). CircuitsVis stays available in Jupyter through
`dec.show(kind="circuitsvis")`.
"""

import os
import tempfile
from html import escape as esc
from pathlib import Path

from tl_depass.app import sections, viz
from tl_depass.app.results import Explanation, top_table
from tl_depass.errors import DepassError
from tl_depass.optional import need

offline = need("plotly.offline", "the HTML report")


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
    if getattr(ex, "patterns", None):
        out.append(("Attention patterns of the top heads", viz.attention_patterns(
            ex.patterns, ex.str_tokens, "Clean attention patterns (query down, key across)")))
    if getattr(ex, "head_tokens", None) is not None:
        b = ex.head_tokens
        rows = [f"{r} ({t:+.2f})" for r, t in zip(b.rows, b.shares.sum(1).tolist(), strict=True)]
        out.append(("Head × source token", viz.grid_heatmap(
            b.shares, rows, b.columns, f"Direct share of {what}: what each head wrote, by source "
            "token")))
    if getattr(ex, "buildup", None) is not None:
        b = ex.buildup
        out.append(("Build-up through the residual stream", viz.grid_heatmap(
            b.shares, b.rows, b.columns, f"Each source token's share of {what}, read directly "
            "from the last position's residual stream")))
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


def facts(ex: Explanation) -> str:
    """The table at the top: prompt, metric, rule, corrupted prompt, completeness, agreement."""
    parts = ["<table class='facts'>",
             f"<tr><th>prompt</th><td><code>{esc(' '.join(ex.str_tokens))}</code></td></tr>",
             f"<tr><th>metric</th><td><code>{esc(ex.metric_name)}</code> at the last position = "
             f"{ex.metric:+.4f}</td></tr>",
             f"<tr><th>MLP rule</th><td>{esc(ex.rule)}</td></tr>",
             "<tr><th>corrupted prompt</th><td>" + (
                 f"<code>{esc(' '.join(ex.corrupted))}</code>" if ex.corrupted else
                 "none given: no activation patching comparison") + "</td></tr>"]
    base = getattr(ex, "corrupted_metric", None)
    if base is not None:
        parts.append(f"<tr><th>patching</th><td>the restoration effect: metric(corrupted run with "
                     "one clean activation restored) &minus; metric(corrupted run), where "
                     f"metric(corrupted run) = {base:+.4f} (add it for the raw patched metric "
                     "that <code>transformer_lens.patching</code> returns)</td></tr>")
    worst = max(max(lv.completeness.values()) for lv in ex.levels.values())
    parts.append(f"<tr><th>completeness</th><td>worst relative error {worst:.1e} (tolerance "
                 f"{ex.tolerance:.0e}): {'OK' if worst <= ex.tolerance else 'FAILED'}</td></tr>")
    for name, lv in ex.levels.items():
        if lv.patching is not None:
            parts.append(f"<tr><th>agreement ({name})</th><td>{lv.agreement()}</td></tr>")
    return "".join(parts) + "</table>"


def tables(ex: Explanation, k: int = 8) -> str:
    """The top `k` components of each level: DePass share and patching effect."""
    parts = ["<div class='tables'>"]
    for name, lv in ex.levels.items():
        rows = "".join(f"<tr><td>{esc(lab)}</td><td>{d:+.3f}</td><td>"
                       f"{'' if p is None else f'{p:+.3f}'}</td></tr>"
                       for lab, d, p in top_table(lv, k))
        parts.append(f"<table class='top'><caption>top {name}</caption><tr><th>component</th>"
                     f"<th>DePass</th><th>patching</th></tr>{rows}</table>")
    return "".join(parts) + "</div>"


def render(ex: Explanation) -> str:
    """The whole page as a string; the same Explanation always gives the same page."""
    figs = figures(ex)
    parts = [f"<h1>DePass: why does <code>{esc(ex.model_name)}</code> predict "
             f"<code>{esc(ex.target)}</code>?</h1>", facts(ex), tables(ex)]
    for i, (title, fig) in enumerate(figs):  # fixed div ids: plotly's default is a random uuid
        parts.append(f"<h2>{esc(title)}</h2><div class='depass-figure'>" + fig.to_html(
            full_html=False, include_plotlyjs=False, div_id=f"depass-figure-{i}") + "</div>")
        if title in sections.NOTES and (title != "Modules" or "heads" in ex.levels):
            parts.append(f"<p class='explain'>{sections.NOTES[title]}</p>")  # under its figure
        if title == "Modules":
            parts.append(sections.heads_vs_modules(ex))
    parts.append(sections.vocab_tables(ex))
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'>"
            f"<meta name='depass-figures' content='{len(figs)}'>"
            f"<title>DePass report: {esc(ex.model_name)}</title><style>{STYLE}</style>"
            f"<script type='text/javascript'>{offline.get_plotlyjs()}</script></head>"
            f"<body>{''.join(parts)}<p class='note'>{esc(NOTE)}</p></body></html>")


def write_html(ex: Explanation, path: str | Path) -> Path:
    """Write the report; plotly.js is inlined, so the file opens with no network."""
    path = Path(path)
    write_atomic(path, render(ex))
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
.note{color:#666;font-size:13px}
.explain{font-size:14px;line-height:1.45;max-width:900px}
table.vocab td,table.vocab th{text-align:left}"""
