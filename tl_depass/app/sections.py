"""The report's words: what each figure shows (`NOTES`, by section title), the vocabulary tables
and the comparison of Heads with Modules. HTML strings, rendered by `tl_depass.app.html`."""

from html import escape as esc

from tl_depass.app.results import Explanation

TOKENS = (
    "Row <b>tokens (embeddings)</b>: each source token's share of the metric (its embedding, with "
    "its position, carried through every layer with attention patterns, norm scales and MLP "
    "activations frozen). Row <b>resid entering L<i>i</i></b> asks a different question: each "
    "position's whole residual stream as it enters layer <i>i</i> (everything the embeddings and "
    "layers 0 to <i>i</i>&minus;1 wrote at that position, whichever token it came from) and its "
    "share of the metric through layer <i>i</i> and the layers after it: what activation "
    "patching of <code>blocks.<i>i</i>.hook_resid_pre</code> restores. In each row the "
    "cells and the bias (not shown) sum to the metric.")
BUILDUP = (
    "How each source token's share reaches the answer. Cell (row, token <i>t</i>): the part of "
    "token <i>t</i>'s share (the first row of Token contributions) that is already in the "
    "<b>last position's</b> residual stream when it enters layer <i>i</i>, read directly through "
    "the final norm (at its clean scale) and the unembedding: a logit lens of the shares. Entering "
    "L0 only the last token is there; each row adds what the layers before it moved to the last "
    "position and wrote there; the final row is the token's whole share (equal, token by token, to "
    "the first row of Token contributions, and to the sums of the columns of Head × source "
    "token; its bias column leaves out the final norm's bias and b_U).")
HEAD_TOKENS = (
    "Which head carried which source token's share. Cell (head, token <i>t</i>): token <i>t</i>'s "
    "share of what the head wrote to the residual stream (its z times W_O; b_O is no head's), read "
    "directly at the last position through the final norm and the unembedding. A head's row sums "
    "to its <b>direct</b> share of the metric, not to its total in the Heads figure, which also "
    "counts what later layers make of its output: a head that works through later heads (a "
    "layer-0 head feeding induction heads, say) has a small row here and a large total there. The "
    "other rows hold everything else written to the residual stream, so each column sums to the "
    "token's share in the final row of the build-up below.")
PATTERNS = (
    "The clean attention pattern (query position down, key position across) of the heads with the "
    "largest |DePass share|. The answer is read at the last query position (the bottom row). "
    "DePass holds these patterns frozen: a head's share is what it moved through its values "
    "(V), never its effect on other heads' patterns (Q and K).")
MODULES = (
    "<b>Heads and Modules split attention differently.</b> In Heads, a head's share is everything "
    "its output does downstream, including what the same layer's MLP makes of it. In Modules, each "
    "layer's MLP is a component of its own: at the MLP the whole activation is credited to the "
    "MLP, so what attention did <i>through the same layer's MLP</i> counts for the MLP, not for "
    "<code>attn</code> (what it does through later layers still counts for <code>attn</code>). A "
    "layer's heads therefore sum to its <code>attn</code> plus their share of that layer's MLP "
    "output followed to the logits: exactly with the ratio rule (linear; tested), approximately "
    "with the softmax and max rules. The table gives both on this prompt; the difference is what "
    "the heads did through their own layer's MLP.")
VOCAB = (
    "Each top component's logits at the last position, minus their mean over the vocabulary "
    "(a shift of every logit changes no probability): the tokens it pushes up and down most. For "
    "heads and modules these are total shares (what later layers do with the output included).")
NOTES = {"Token contributions": TOKENS, "Build-up through the residual stream": BUILDUP,
         "Head × source token": HEAD_TOKENS, "Attention patterns of the top heads": PATTERNS,
         "Modules": MODULES}


def heads_vs_modules(ex: Explanation) -> str:
    """Per layer: its heads' sum (Heads), its attention (Modules), the difference."""
    heads, modules = ex.levels.get("heads"), ex.levels.get("modules")
    if heads is None or modules is None:
        return ""
    rows = []
    for c, label in enumerate(modules.components):
        if label.kind != "attn":
            continue
        total = sum(heads.depass[i].item() for i, h in enumerate(heads.components)
                    if h.layer == label.layer)
        attn = modules.depass[c].item()
        rows.append(f"<tr><td>L{label.layer}</td><td>{total:+.3f}</td><td>{attn:+.3f}</td>"
                    f"<td>{total - attn:+.3f}</td></tr>")
    only = " (attention-only: no MLP, so they agree)" if len(modules.components) == len(rows) else ""
    return (f"<table class='top'><caption>on this prompt{only}</caption><tr><th>layer</th><th>sum of its "
            "heads (Heads)</th><th>attn (Modules)</th><th>difference (through the layer's "
            f"MLP)</th></tr>{''.join(rows)}</table>")


def vocab_tables(ex: Explanation) -> str:
    """For each level: its top components and the tokens they push up and down."""
    parts = []
    for name, lv in ex.levels.items():
        if not getattr(lv, "vocab", None):
            continue
        rows = "".join(
            f"<tr><td>{esc(label)}</td><td>{_tokens(up)}</td><td>{_tokens(down)}</td></tr>"
            for label, (up, down) in lv.vocab.items())
        parts.append(f"<table class='top vocab'><caption>{esc(name)}</caption><tr><th>component"
                     f"</th><th>pushes up</th><th>pushes down</th></tr>{rows}</table>")
    if not parts:
        return ""
    return (f"<h2>Top tokens in the vocabulary</h2><p class='note'>{VOCAB}</p>"
            f"<div class='tables'>{''.join(parts)}</div>")


def _tokens(pairs: list[tuple[str, float]]) -> str:
    return " ".join(f"<code>{esc(t)}</code>&nbsp;{v:+.2f}" for t, v in pairs)
