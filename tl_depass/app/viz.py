"""Pictures of DePass results: plotly figures (interactive in Jupyter and in the HTML report) and a
CircuitsVis token view for Jupyter.

Every function returns a displayable object (a `plotly.graph_objects.Figure`, or CircuitsVis'
`RenderedHTML`); nothing is drawn by hand. `Decomposition.show()` picks the picture that fits the
level the decomposition was made at.
"""

from collections.abc import Mapping, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from tl_depass.errors import DepassError
from tl_depass.optional import need

go = need("plotly.graph_objects", "drawing DePass results")
make_subplots = need("plotly.subplots", "drawing DePass results").make_subplots

#: Diverging colours centred on zero: red pushes the answer down, blue pushes it up (as in
#: TransformerLens' and Neel Nanda's plotting utilities).
SCALE = "RdBu"


def _layout(fig: go.Figure, title: str, height: int) -> go.Figure:
    fig.update_layout(title=title, height=height, margin=dict(l=60, r=30, t=60, b=50),
                      template="plotly_white")
    return fig


def token_heatmap(scores: Float[Tensor, "row pos"], tokens: Sequence[str],
                  rows: Sequence[str] | None = None, title: str = "Token contributions"
                  ) -> go.Figure:
    """One cell per (row, position): a row per layer (each position's residual stream entering
    that layer) or per prompt; x labels are the tokens."""
    scores = scores.detach().double().cpu()
    rows = list(rows) if rows is not None else [str(r) for r in range(scores.shape[0])]
    x = [f"{p}: {t}" for p, t in enumerate(tokens)]
    bound = max(scores.abs().max().item(), 1e-12)
    fig = go.Figure(go.Heatmap(
        z=scores.tolist(), x=x, y=rows, colorscale=SCALE, zmid=0, zmin=-bound, zmax=bound,
        text=[[f"{v:+.2f}" for v in row] for row in scores.tolist()], texttemplate="%{text}",
        hovertemplate="%{y}<br>%{x}<br>score %{z:+.4f}<extra></extra>",
        colorbar=dict(title="score")))
    fig.update_yaxes(autorange="reversed", type="category")
    fig.update_xaxes(type="category", tickangle=-45)
    return _layout(fig, title, 180 + 45 * len(rows))


def head_heatmap(scores: Float[Tensor, "layer head_index"], title: str = "Heads (layer x head)"
                 ) -> go.Figure:
    """Each head's score, layers down, heads across (NaN cells are blank)."""
    scores = scores.detach().double().cpu()
    finite = scores[scores.isfinite()]
    bound = max(finite.abs().max().item() if finite.numel() else 0.0, 1e-12)
    fig = go.Figure(go.Heatmap(
        z=[[None if v != v else v for v in row] for row in scores.tolist()],
        x=[f"H{h}" for h in range(scores.shape[1])], y=[f"L{i}" for i in range(scores.shape[0])],
        colorscale=SCALE, zmid=0, zmin=-bound, zmax=bound,
        text=[[("" if v != v else f"{v:+.2f}") for v in row] for row in scores.tolist()],
        texttemplate="%{text}", hovertemplate="%{y}%{x}<br>score %{z:+.4f}<extra></extra>",
        colorbar=dict(title="score")))
    fig.update_yaxes(autorange="reversed", type="category")
    fig.update_xaxes(type="category")
    return _layout(fig, title, 160 + 50 * scores.shape[0])


def grid_heatmap(scores: Float[Tensor, "row column"], rows: Sequence[str], columns: Sequence[str],
                 title: str) -> go.Figure:
    """One cell per (row, column), rows down, columns across, coloured around zero."""
    scores = scores.detach().double().cpu()
    bound = max(scores.abs().max().item(), 1e-12)
    fig = go.Figure(go.Heatmap(
        z=scores.tolist(), x=list(columns), y=list(rows), colorscale=SCALE, zmid=0, zmin=-bound,
        zmax=bound, text=[[f"{v:+.2f}" for v in row] for row in scores.tolist()],
        texttemplate="%{text}", hovertemplate="%{y}<br>%{x}<br>share %{z:+.4f}<extra></extra>",
        colorbar=dict(title="share")))
    fig.update_yaxes(autorange="reversed", type="category")
    fig.update_xaxes(type="category", tickangle=-45)
    return _layout(fig, title, 200 + 40 * len(rows))


def attention_patterns(patterns: Mapping[str, Float[Tensor, "query_pos key_pos"]],
                       tokens: Sequence[str], title: str = "Attention patterns") -> go.Figure:
    """One heatmap per head (query positions down, key positions across, 0 to 1), two per row."""
    names = list(patterns)
    cols = min(len(names), 2)
    rows = -(-len(names) // cols)
    ticks = [f"{p}: {t}" for p, t in enumerate(tokens)]
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=names, horizontal_spacing=0.12,
                        vertical_spacing=0.25 / rows)
    for i, name in enumerate(names):
        z = patterns[name].detach().double().cpu().tolist()
        fig.add_trace(go.Heatmap(
            z=z, x=ticks, y=ticks, zmin=0, zmax=1, colorscale="Blues", showscale=i == 0,
            colorbar=dict(title="attention"), name=name,
            hovertemplate=name + "<br>query %{y}<br>key %{x}<br>%{z:.3f}<extra></extra>"),
            row=i // cols + 1, col=i % cols + 1)
    fig.update_yaxes(autorange="reversed", type="category", tickfont=dict(size=9))
    fig.update_xaxes(type="category", tickangle=-60, tickfont=dict(size=9))
    return _layout(fig, title, 120 + 420 * rows)


def top_bar(scores: Float[Tensor, " component"], labels: Sequence[str], k: int = 20,
            title: str = "Top components") -> go.Figure:
    """The k components with the largest |score|, largest first."""
    scores = scores.detach().double().cpu()
    if len(labels) != scores.shape[0]:
        raise DepassError(f"{scores.shape[0]} scores but {len(labels)} labels")
    order = scores.abs().argsort(descending=True)[:k].tolist()
    values = [scores[i].item() for i in order]
    fig = go.Figure(go.Bar(
        x=values[::-1], y=[labels[i] for i in order][::-1], orientation="h",
        marker_color=["#2166ac" if v >= 0 else "#b2182b" for v in values[::-1]],
        hovertemplate="%{y}<br>score %{x:+.4f}<extra></extra>"))
    fig.update_yaxes(type="category")
    fig.update_xaxes(title="score", zeroline=True)
    return _layout(fig, title, 160 + 22 * len(order))


def completeness_plot(errors: Mapping[str, Mapping[str, float]], tolerance: float,
                      title: str = "Completeness: max|sum of components - clean| / max|clean|"
                      ) -> go.Figure:
    """Relative completeness error at each hook (residual stream, in forward order) for each
    decomposition, on a log scale, with the tolerance as a dashed line."""
    fig = go.Figure()
    hooks: list[str] = []
    for name, per_hook in errors.items():
        xs = list(per_hook)
        hooks += [h for h in xs if h not in hooks]
        # Exact zeros cannot sit on a log axis: show them at the smallest positive float64 step.
        ys = [max(v, 1e-17) for v in per_hook.values()]
        fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines+markers", name=name,
                                 hovertemplate="%{x}<br>%{y:.2e}<extra>" + name + "</extra>"))
    fig.add_trace(go.Scatter(x=hooks, y=[tolerance] * len(hooks), mode="lines", name="tolerance",
                             line=dict(dash="dash", color="grey")))
    fig.update_yaxes(type="log", title="relative error", exponentformat="e")
    fig.update_xaxes(type="category", categoryorder="array", categoryarray=hooks, tickangle=-45)
    return _layout(fig, title, 420)


def patching_scatter(panels: Mapping[str, tuple[Tensor, Tensor, Sequence[str], str]],
                     title: str = "DePass vs activation patching") -> go.Figure:
    """One panel per level: x = DePass share of the metric, y = activation patching effect;
    `panels[level] = (depass, patching, labels, agreement text)`."""
    names = list(panels)
    cols = min(len(names), 2)
    rows = -(-len(names) // cols)
    fig = make_subplots(rows=rows, cols=cols, vertical_spacing=0.3 / rows, subplot_titles=[
        f"{n}: {p[3]}" for n, p in panels.items()])
    for i, name in enumerate(names):
        row, col = i // cols + 1, i % cols + 1
        depass, patched, labels, _ = panels[name]
        x, y = depass.detach().double().flatten().tolist(), patched.detach().double().flatten().tolist()
        fig.add_trace(go.Scatter(x=x, y=y, mode="markers", text=list(labels), name=name,
                                 hovertemplate="%{text}<br>DePass %{x:+.3f}<br>patching %{y:+.3f}"
                                 "<extra></extra>"), row=row, col=col)
        fig.update_xaxes(title_text="DePass share of the metric", row=row, col=col)
        fig.update_yaxes(title_text="patching effect" if col == 1 else None, row=row, col=col)
    fig.update_layout(showlegend=False)
    return _layout(fig, title, 120 + 340 * rows)


def show(dec, answer=None, wrong=None, *, pos: int = -1, batch: int = 0, k: int = 20,
         kind: str = "plotly"):
    """The picture that fits `dec`'s level, for the answer's logit (minus `wrong`'s) at `pos`
    (default answer: the model's top prediction). Tokens: a heatmap over positions (one row per
    prompt; `kind="circuitsvis"` gives CircuitsVis' colored tokens for prompt `batch`); heads: a
    layer x head heatmap; neurons and anything else: the top-k components as bars."""
    if kind not in ("plotly", "circuitsvis"):
        raise DepassError(f"unknown kind {kind!r}; use 'plotly' or 'circuitsvis'")
    if answer is None:
        answer = dec._clean_at(pos).argmax(-1)
    scores = dec.logit_attribution(answer, wrong, pos)  # [component, batch]
    target = _answer_name(dec, answer, batch)
    what = f"logit({target})" + ("" if wrong is None else f" - logit({_answer_name(dec, wrong, batch)})")
    labels = dec.component_labels
    is_token = [label.kind == "token" for label in labels]
    if sum(is_token) == dec.tokens.shape[1] and len(dec.groups) == 1:
        values = scores[:-1][torch.tensor(is_token[:-1])]  # drop "pos" and "bias"
        strs = _str_tokens(dec, batch)
        if kind == "circuitsvis":
            cv_tokens = need("circuitsvis.tokens", "kind='circuitsvis'")

            return cv_tokens.colored_tokens(strs, values[:, batch].tolist())
        rows = [f"prompt {b}" for b in range(values.shape[1])]
        return token_heatmap(values.T, strs if values.shape[1] == 1 else
                             [str(p) for p in range(values.shape[0])], rows,
                             f"Token contributions to {what}")
    if kind == "circuitsvis":
        raise DepassError("kind='circuitsvis' shows token-level decompositions; use kind='plotly'")
    if any(label.kind == "head" for label in labels):
        return head_heatmap(dec.head_scores(answer, wrong, pos)[batch],
                            f"Heads: total effect on {what}")
    # a layer's "rest" (the residual stream entering it) is not one of its parts
    keep = [i for i, label in enumerate(labels) if not (label.kind == "rest" and label.layer is not None)]
    return top_bar(scores[keep, batch], [dec.labels[i] for i in keep], k,
                   f"Top components: contributions to {what}")


def _answer_name(dec, answer, batch: int) -> str:
    if isinstance(answer, str):
        return repr(answer)
    ids = torch.as_tensor(answer).reshape(-1)
    i = int(ids[batch if ids.numel() > 1 else 0])
    return repr(dec.model.to_string([i])) if dec.model.tokenizer is not None else f"[{i}]"


def _str_tokens(dec, batch: int) -> list[str]:
    if dec.model.tokenizer is None:
        return [f"[{int(t)}]" for t in dec.tokens[batch]]
    return list(dec.model.to_str_tokens(dec.tokens[batch]))
