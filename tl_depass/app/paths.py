"""The report's finer views, computed with the engine: which head carried which source token's
share (`token_paths`' first table), how each source token's share builds up through the residual
stream (its second), the top heads' attention patterns (`patterns`) and what a component pushes
up and down in the vocabulary (`vocabulary`).

Both tables are linear readouts of one token-level decomposition (`TokensAt(0)`: each source
token's share of every activation, the bias last), kept at the residual stream entering every
layer, the final residual stream, each layer's `attn.hook_z`, `hook_attn_out` and `hook_mlp_out`:

- head (L, h) x source token t: token t's share of head h's z at layer L, times `W_O[L, h]`: the
  share of t that head h wrote into the residual stream (b_O is not a head's: bias);
- build-up: token t's share of the residual stream entering layer L (then of the final one).

Each such vector is read at the last position through the final norm (its clean scale) and the
unembedding, i.e. its DIRECT share of the metric: the engine does that reading, as one `Split` of
the final residual stream whose parts are these vectors (plus one balancing part, not shown, that
makes them sum to the clean residual). A head's row sums to its direct share of the metric; the
"final residual stream" row is each token's whole share (the token level's, exactly), and it is
also the sum of every row of the head table (the rest of the heads, the MLPs and the embeddings'
direct path included).
"""

from collections.abc import Sequence

import einops
import torch
from jaxtyping import Float, Int
from torch import Tensor

from tl_depass.app.results import Breakdown
from tl_depass.decompose import decompose
from tl_depass.engine.backends import Model
from tl_depass.engine.clean_run import record_clean_run
from tl_depass.engine.hooks import attn_out, attn_z, block_hook, mlp_out, resid_post, resid_pre
from tl_depass.errors import DepassError
from tl_depass.evaluate.metrics import Metric, metric_gradient
from tl_depass.levels import Split, TokensAt
from tl_depass.levels.label import Label
from tl_depass.tolerances import completeness_rtol


def last_position_scores(model: Model, dec, metric: Metric) -> Float[Tensor, " component"]:
    """Each component's share of `metric` (which reads the last position's logits) from a
    decomposition made with logits="last": <d metric / d logits, component logits> at the clean
    logits, through any final softcap (exact for a logit difference)."""
    grad = metric_gradient(model, dec.clean_logits, metric)
    return einops.einsum(dec.logits, grad[:, -1].to(dec.logits), "c b v, b v -> c")


def token_paths(model: Model, tokens: Int[Tensor, "1 pos"], heads: Sequence[Label], rule: str,
                metric: Metric, str_tokens: Sequence[str]) -> tuple[Breakdown, Breakdown]:
    """(head x source token, build-up through the residual stream): see the module docstring.
    `heads`: the heads to show one by one; columns: the prompt's tokens, then "bias"."""
    cfg, n_layers = model.cfg, model.cfg.n_layers
    columns = [f"{p}: {t}" for p, t in enumerate(str_tokens)] + ["bias"]
    keep = [resid_pre(layer) for layer in range(n_layers)] + [resid_post(n_layers - 1)]
    keep += [attn_z(layer) for layer in range(n_layers)] + [attn_out(layer) for layer in range(n_layers)]
    keep += [] if cfg.attn_only else [mlp_out(layer) for layer in range(n_layers)]
    tok = decompose(model, tokens, TokensAt(0), mlp_rule=rule, keep=keep, logits=None)
    if len(tok.labels) != len(columns):
        raise DepassError(f"the token level has {len(tok.labels)} components, not one per token "
                          f"and the bias ({len(columns)}): report this as a bug of tl_depass")
    final = tok[resid_post(n_layers - 1)]  # [component, 1, pos, d_model]
    W_O = model.W_O.detach().to(final)
    by_head = [einops.einsum(tok[attn_z(h.layer)][:, :, :, h.index], W_O[h.layer, h.index],
                             "c b p e, e d -> c b p d") for h in heads]
    attention = sum(tok[attn_out(layer)] for layer in range(n_layers))
    mlps = sum(tok[mlp_out(layer)] for layer in range(n_layers)) if not cfg.attn_only else None
    head_rows = [(h.name, v) for h, v in zip(heads, by_head, strict=True)]
    head_rows.append(("other heads (and b_O)", attention - sum(by_head)))
    if mlps is not None:
        head_rows.append(("MLPs", mlps))
    head_rows.append(("embeddings (direct)", tok[resid_pre(0)]))
    remainder = final - sum(v for _, v in head_rows[len(heads):]) - sum(by_head)
    if remainder.abs().max() > completeness_rtol(final.dtype) * final.abs().max():
        head_rows.append(("not written by attention or MLPs", remainder))  # not a pre-norm block
    build_rows = [(f"resid entering L{layer}" + (" (embeddings)" if layer == 0 else ""),
                   tok[resid_pre(layer)]) for layer in range(n_layers)]
    build_rows.append((f"final residual (after L{n_layers - 1})", final))
    vectors = torch.cat([v for _, v in head_rows + build_rows])  # [row * column, 1, pos, d_model]
    clean = tok.clean[resid_post(n_layers - 1)]
    parts = torch.cat([vectors, (clean - vectors.sum(0))[None]])
    read = decompose(model, tokens, Split(resid_post(n_layers - 1), parts), mlp_rule=rule, keep=[],
                     logits="last")
    shares = last_position_scores(model, read, metric)[:-2].reshape(-1, len(columns))  # no balance, bias
    k = len(head_rows)
    return (Breakdown([name for name, _ in head_rows], list(columns), shares[:k]),
            Breakdown([name for name, _ in build_rows], list(columns), shares[k:]))


def patterns(model: Model, tokens: Int[Tensor, "1 pos"], heads: Sequence[Label]
             ) -> dict[str, Float[Tensor, "query_pos key_pos"]]:
    """The clean attention pattern of each head in `heads` (the prompt's only row)."""
    wanted = {block_hook(h.layer, "attn.hook_pattern") for h in heads}
    clean = record_clean_run(model, tokens, None, lambda name: name in wanted)
    return {h.name: clean[block_hook(h.layer, "attn.hook_pattern")][0, h.index].detach().cpu()
            for h in heads}


def vocabulary(model: Model, logits: Float[Tensor, " d_vocab"], k: int = 5
               ) -> tuple[list[tuple[str, float]], list[tuple[str, float]]]:
    """The `k` tokens a component's logits (at the last position) push up most and down most,
    relative to their mean over the vocabulary (a constant shift changes no probability)."""
    centred = (logits - logits.mean()).detach().cpu()
    k = min(k, centred.numel())
    up, down = centred.topk(k), (-centred).topk(k)

    def named(ids: Tensor, values: Tensor) -> list[tuple[str, float]]:
        names = (model.to_str_tokens(ids) if model.tokenizer is not None
                 else [f"[{i}]" for i in ids.tolist()])
        return list(zip(names, values.tolist(), strict=True))

    return named(up.indices, up.values), named(down.indices, -down.values)
