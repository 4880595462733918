"""docs/results.md from evaluation results: Markdown tables, matplotlib figures, the conditions."""

import math
from pathlib import Path

import pandas as pd

from tl_depass.evaluate import components as C
from tl_depass.evaluate.run import Result
from tl_depass.optional import need

DEPASS = ("DePass (softmax)", "DePass (ratio)")
EXACT = ("exact zero-ablation", "exact patching (corrupted)")
NOT_BASELINES = (*DEPASS, *EXACT, "random")


def fmt(value, digits: int = 2) -> str:
    if isinstance(value, str):
        return value.replace("|", "\\|")  # a literal | would split the Markdown cell
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, int):
        return str(value)
    return f"{value:.{digits}f}"


def md_table(frame: pd.DataFrame, digits: int = 2) -> str:
    head = "| " + " | ".join(fmt(str(c)) for c in frame.columns) + " |"
    rule = "|" + "|".join("---" for _ in frame.columns) + "|"
    rows = ["| " + " | ".join(fmt(v, digits) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([head, rule, *rows])


def best_baseline(frame: pd.DataFrame, column: str, higher: bool) -> str:
    others = frame[~frame.method.isin(NOT_BASELINES)]
    best = others[column].max() if higher else others[column].min()
    tied = others.method[others[column] == best].tolist()
    names = tied[0] if len(tied) == 1 else f"{tied[0]} and {len(tied) - 1} more, tied"
    return f"{best:.2f} ({names})"


def value(frame: pd.DataFrame, method: str, column: str) -> float:
    return float(frame.loc[frame.method == method, column].iloc[0])


def rank(frame: pd.DataFrame, method: str, column: str, higher: bool) -> str:
    """`method`'s place among the non-exact methods (ties share the better place)."""
    others = frame[~frame.method.isin(EXACT)]
    ranks = others[column].rank(ascending=not higher, method="min")
    mine = ranks[others.method == method].iloc[0]
    tie = "=" if (ranks == mine).sum() > 1 else ""
    return f"{tie}{int(mine)}/{len(others)}"


def headline(results: list[Result]) -> pd.DataFrame:
    """One row per (model, measure): both DePass rules, their ranks, the best baseline, random."""
    rows = []

    def add(model: str, measure: str, frame: pd.DataFrame, column: str, higher: bool):
        rows.append({"model": model, "measure": measure,
                     **{m: value(frame, m, column) for m in DEPASS},
                     "ranks (softmax, ratio)": ", ".join(rank(frame, m, column, higher) for m in DEPASS),
                     "best baseline": best_baseline(frame, column, higher),
                     "random": value(frame, "random", column)})

    for r in results:
        add(r.model, "tokens: Disrupt-top AOPC ↑", r.tokens, "disrupt_aopc", True)
        add(r.model, "tokens: Recover-top AOPC ↓", r.tokens, "recover_aopc", False)
        if not math.isnan(r.chance_hit_rate):  # real text: no key positions, no hit rate
            add(r.model, "tokens: hit rate ↑", r.tokens, "hit_rate", True)
        for what, frames in [("heads", r.heads), *[(f"L{lay} neurons", f) for lay, f in r.neurons.items()]]:
            ab = frames["ablation"]
            k = C.n_units(0.1, r.scores[what]["random"].numel())  # the top 10%, at least one
            top = ab[(ab.ablated == "top") & (ab.k == k)]
            add(r.model, f"{what}: accuracy, top {k} ablated ↓", top, "accuracy", False)
            add(r.model, f"{what}: logit diff, top {k} ablated ↓", top, "logit_diff", False)
            corr = frames["correlation"]
            corr = corr[corr.reference == EXACT[0]]
            add(r.model, f"{what}: Spearman with zero-ablation ↑", corr, "spearman", True)
    return pd.DataFrame(rows)


def token_table(r: Result) -> str:
    t = r.tokens
    columns = {"disrupt_aopc": "Disrupt-top AOPC ↑", "recover_aopc": "Recover-top AOPC ↓",
               "area_between": "Disrupt − Recover ↑"}
    frame = pd.DataFrame({"method": t.method, **{
        title: [f"{m:.1f} ± {se:.1f}" for m, se in zip(t[key], t[f"{key}_se"], strict=True)]
        for key, title in columns.items()}, "hit rate ↑": t.hit_rate, "seconds": t.seconds})
    if math.isnan(r.chance_hit_rate):
        chance = ("Mean ± standard error over prompts. Hit rate: not defined (n/a), real text has "
                  "no ground-truth key positions.")
    else:
        chance = (f"Mean ± standard error over prompts. Chance hit rate (a uniformly random "
                  f"processable position): {r.chance_hit_rate:.2f}.")
    return md_table(frame) + "\n\n" + chance


def ablation_table(frames: dict[str, pd.DataFrame], total: int) -> str:
    ab = frames["ablation"]
    wide = {}
    for row in ab.itertuples(index=False):
        key = f"{row.ablated} {row.k}"
        cell = f"{row.accuracy:.2f} / {row.logit_diff:+.2f}"
        wide.setdefault(row.method, {"method": row.method})[key] = cell
    frame = pd.DataFrame(list(wide.values()))
    return (md_table(frame) + "\n\nEach cell: answer accuracy / mean logit difference after "
            f"zero-ablating the method's top (or bottom) k of {total} units. Lower after top-k "
            "ablation and higher after bottom-k ablation mean a more faithful ranking.")


def correlation_table(frames: dict[str, pd.DataFrame]) -> str:
    corr = frames["correlation"]
    parts = []
    for ref, short in zip(EXACT, ("zero-abl.", "patching"), strict=True):
        c = corr[corr.reference == ref].set_index("method")
        parts.append(c[["pearson", "spearman", "spearman_abs"]].rename(columns={
            "pearson": f"Pearson vs {short}", "spearman": f"Spearman vs {short}",
            "spearman_abs": f"Spearman vs abs {short}"}))
    table = pd.concat(parts, axis=1)
    seconds = frames["seconds"].set_index("method").seconds
    table["seconds"] = seconds.reindex(table.index)
    rows = md_table(table.reset_index())
    ref_seconds = ", ".join(f"{m}: {seconds[m]:.2f} s" for m in EXACT)
    return rows + f"\n\nThe references themselves ({ref_seconds})."


def figures(r: Result, folder: Path) -> list[Path]:
    need("matplotlib", "the evaluation's figures").use("Agg")
    plt = need("matplotlib.pyplot", "the evaluation's figures")

    folder.mkdir(parents=True, exist_ok=True)
    out = []
    tab = plt.cm.tab20.colors
    names = list(r.curves) + [m for f in [r.heads, *r.neurons.values()] for m in f["ablation"].method]
    color = {m: (tab[::2] + tab[1::2])[i % 20] for i, m in enumerate(dict.fromkeys(names))}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    from tl_depass.evaluate.tokens import PERCENTS

    for name, curves in r.curves.items():
        style = dict(lw=2.5) if name in DEPASS else dict(lw=1, ls="--" if name == "random" else "-")
        for ax, mode in zip(axes, ("disrupt", "recover"), strict=True):
            ax.plot(PERCENTS, curves[mode].numpy(), label=name, color=color[name], **style)
    for ax, title in zip(axes, ("Disrupt-top (higher is better)", "Recover-top (lower is better)"),
                         strict=True):
        ax.set(title=title, xlabel="% of processable tokens deleted / kept",
               ylabel="|p_clean − p_masked| / p_clean × 100")
    axes[1].legend(fontsize=7)
    fig.suptitle(f"{r.model}: token deletion")
    fig.tight_layout()
    out.append(folder / f"{r.model}_tokens.png")
    fig.savefig(out[-1], dpi=110)
    plt.close(fig)

    units = [("heads", r.heads)] + [(f"L{layer}_neurons", f) for layer, f in r.neurons.items()]
    fig, axes = plt.subplots(1, len(units), figsize=(5.5 * len(units), 4), squeeze=False)
    for ax, (what, frames) in zip(axes[0], units, strict=True):
        ab = frames["ablation"]
        for method, group in ab[ab.ablated == "top"].groupby("method", sort=False):
            style = dict(lw=2.5) if method in DEPASS else dict(
                lw=1, ls=":" if method in EXACT else "--" if method == "random" else "-")
            ax.plot(group.percent, group.logit_diff, marker="o", ms=3, label=method, color=color[method],
                    **style)
        ax.axhline(r.clean["logit_diff"], color="grey", lw=0.8)
        ax.set(title=f"{what.replace('_', ' ')}: top-k zero-ablated", xlabel="% of units ablated",
               ylabel="mean logit difference (lower is better)")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    out.append(folder / f"{r.model}_ablation.png")
    fig.savefig(out[-1], dpi=110)
    plt.close(fig)
    return out


FINDINGS_LINK = ("What is measured, what wins and what loses, and the caveats: "
                 "[docs/findings.md](findings.md), written by hand from these tables.")

HEADLINE_NOTE = """\
Arrows: ↑ higher is better, ↓ lower is better. "ranks": the place of each DePass rule among all
non-exact methods (DePass's two rules, the baselines and random; "=" marks a place shared
with other methods).
"best baseline" is the best of the non-DePass, non-exact, non-random methods on that measure,
picked after the fact for each row (an optimistic bar: no single baseline wins every row).
Ablation rows use the top 10% of the units (at least one); the full tables follow."""


def markdown(results: list[Result], conditions: str, describe: dict[str, str], folder: Path,
             figure_prefix: str) -> str:
    lines = ["# Faithfulness of DePass and the baselines on the bundled models", "",
             "Generated by `python -m tl_depass.evaluate --all` (do not edit by hand: rerun it).", "",
             conditions, "", FINDINGS_LINK, "", "## Headline", "",
             md_table(headline(results)), "", HEADLINE_NOTE, ""]
    for r in results:
        paths = figures(r, folder)
        lines += [f"## {r.model}", "", describe.get(r.model, ""), "",
                  f"Clean: accuracy {r.clean['accuracy']:.3f}, mean logit difference "
                  f"{r.clean['logit_diff']:.2f}; {r.seconds:.0f} s for every protocol.", "",
                  "### Tokens", "", token_table(r), "",
                  f"![{r.model} token deletion]({figure_prefix}/{paths[0].name})", "",
                  "### Heads: ablation", "", ablation_table(r.heads, r.scores["heads"]["random"].numel()), "",
                  "### Heads: agreement with exact per-head effects", "", correlation_table(r.heads), ""]
        for layer, frames in r.neurons.items():
            total = r.scores[f"L{layer} neurons"]["random"].numel()
            lines += [f"### Neurons of layer {layer}: ablation", "", ablation_table(frames, total), "",
                      f"### Neurons of layer {layer}: agreement with exact per-neuron effects", "",
                      correlation_table(frames), ""]
        lines += [f"![{r.model} ablation]({figure_prefix}/{paths[1].name})", ""]
    return "\n".join(lines)
