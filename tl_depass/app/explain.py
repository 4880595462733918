"""Explain one prediction at every level: the computing half of `tl-depass explain`.

`explain(model, Prompt(tokens, target, wrong, corrupted))` runs DePass at the token level (from
every layer's residual stream), on all heads, on attention and MLP modules and on one layer's
neurons, checks completeness, and, given a corrupted prompt, runs activation patching at the same
levels (`tl_depass.evaluate.compare` and `transformer_lens.patching`). It returns an `Explanation`:
tensors, labels and correlations, nothing drawn. `tl_depass.app.html` renders it to a
self-contained HTML page (`write_html`, also importable from here).
"""

import warnings
from collections.abc import Sequence

import torch
from jaxtyping import Int
from torch import Tensor
from tqdm.auto import tqdm

from tl_depass.app import paths
from tl_depass.app.results import Explanation, LevelScores, Prompt, top_table  # noqa: F401 (public here too)
from tl_depass.decompose import decompose
from tl_depass.engine.backends import Model
from tl_depass.engine.hooks import attn_z, block_hook, resid_pre
from tl_depass.engine.rules import RULES, Rule
from tl_depass.engine.validate import public
from tl_depass.errors import DepassError
from tl_depass.evaluate import compare
from tl_depass.evaluate.metrics import correlation, logit_diff_rows
from tl_depass.evaluate.patch import Patch, patch_each
from tl_depass.levels import Heads, Modules, Neurons, TokensAt
from tl_depass.tolerances import completeness_rtol

LEVELS = ("tokens", "heads", "modules", "neurons")
TOP = 8  # components per level in the report's tables (and their top vocabulary tokens)


def worst_per_hook(dec) -> dict[str, float]:
    """Completeness error per hook, worst over groups (keys "hook [group]" collapse to "hook")."""
    out: dict[str, float] = {}
    for key, err in dec.completeness_error().items():
        hook = key.split(" [")[0]
        out[hook] = max(out.get(hook, 0.0), err)
    return out


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
                mlps = out.get("modules") or run.depass(Modules(), ("mlp",))
                shares = {label.layer: abs(score.item()) for label, score in
                          zip(mlps.components, mlps.depass, strict=True) if label.kind == "mlp"}
                neuron_layer = max(shares, key=shares.get)
            out[name] = run.neurons(neuron_layer)
    return tokens_by_layer, tokens_patching, neuron_layer


@public
def explain(model: Model, prompt: Prompt | Tensor, *legacy: object, levels: Sequence[str] = LEVELS,
            rule: Rule = "softmax", neuron_layer: int | None = None, model_name: str = "model",
            progress: bool = True, patch_limit: int = 512) -> Explanation:
    """DePass at `levels` (default all; "neurons" only where the model has MLPs) for the prompt's
    target (minus its wrong answer) at the last position; activation patching at the same levels
    when it has a corrupted prompt. `neuron_layer=None`: the layer whose MLP has the largest
    share of the metric. Patching at most `patch_limit` neurons (a random sample above that).
    The old positional call `explain(model, tokens, target, wrong, corrupted, rule, ...)` still
    works, with a DeprecationWarning."""
    options = dict(levels=levels, rule=rule, neuron_layer=neuron_layer, model_name=model_name,
                   progress=progress, patch_limit=patch_limit)
    if isinstance(prompt, Tensor):
        prompt = _legacy(prompt, legacy, options)
    elif legacy:
        raise DepassError(f"explain takes the model and a Prompt, then options by keyword only; "
                          f"got {len(legacy)} more positional argument(s): pass rule=..., levels=...")
    return _explain(model, prompt, **options)


OLD_OPTIONS = ("rule", "neuron_layer", "model_name", "levels", "progress", "patch_limit")


def _legacy(tokens: Tensor, legacy: tuple, options: dict) -> Prompt:
    """The deprecated call explain(model, tokens, target, wrong, corrupted, *OLD_OPTIONS)."""
    if not 3 <= len(legacy) <= 3 + len(OLD_OPTIONS):
        raise DepassError("explain(model, tokens, target, wrong, corrupted, ...) needs target, wrong "
                          "and corrupted; better: explain(model, Prompt(tokens, target, wrong, "
                          "corrupted), rule=..., levels=...)")
    warnings.warn("explain(model, tokens, target, wrong, corrupted, ...) is deprecated: call "
                  "explain(model, Prompt(tokens, target, wrong, corrupted), rule=..., levels=...)",
                  DeprecationWarning, stacklevel=4)  # _legacy, explain, public's wrapper, caller
    options.update(zip(OLD_OPTIONS, legacy[3:], strict=False))
    return Prompt(tokens, *legacy[:3])


def _explain(model: Model, prompt: Prompt, levels: Sequence[str], rule: str,
             neuron_layer: int | None, model_name: str, progress: bool, patch_limit: int
             ) -> Explanation:
    cfg = model.cfg
    tokens, target, wrong, corrupted = prompt.tokens, prompt.target, prompt.wrong, prompt.corrupted
    unknown = [name for name in levels if name not in LEVELS]
    if unknown:
        raise DepassError(f"unknown levels {unknown}; use some of {list(LEVELS)}")
    if rule not in RULES:
        raise DepassError(f"unknown rule {rule!r}; use one of {RULES}")
    for what, token in (("target", target), ("wrong", wrong)):
        if token is not None and not 0 <= token < cfg.d_vocab:
            raise DepassError(f"{what}={token} is not a token id of this model (0..{cfg.d_vocab - 1}); "
                              "pass model.to_single_token(text)")
    if cfg.attn_only:
        levels = [name for name in levels if name != "neurons"]
    run = Run(model, tokens, corrupted, target, wrong, rule, patch_limit)
    bar = tqdm(levels, desc="tl-depass", disable=not progress, leave=False)
    out: dict[str, LevelScores] = {}
    tokens_by_layer, tokens_patching, neuron_layer = run_levels(run, bar, out, neuron_layer)
    str_tokens = list(model.to_str_tokens(tokens[0])) if model.tokenizer is not None else [
        f"[{int(t)}]" for t in tokens[0]]
    name = (lambda i: model.to_string([i])) if model.tokenizer is not None else (lambda i: f"[{i}]")
    with torch.no_grad():
        value = run.metric(model(tokens)).item()
    top = top_heads(out["heads"]) if "heads" in out else []
    head_tokens = buildup = None
    if "tokens" in out:
        head_tokens, buildup = paths.token_paths(model, tokens, top, rule, run.metric, str_tokens)
    return Explanation(
        model_name, str_tokens, name(target), None if wrong is None else name(wrong), value, rule,
        completeness_rtol(cfg.dtype), None if corrupted is None else [name(int(t)) for t in corrupted[0]],
        neuron_layer if "neurons" in out else None, out, tokens_by_layer, tokens_patching,
        None if corrupted is None else run.corrupted_metric(),
        paths.patterns(model, tokens, top) if top else None,
        head_tokens if top else None, buildup)


def top_heads(level: LevelScores, k: int = 4) -> list:
    """The `k` heads with the largest |DePass share| (structured labels), largest first."""
    order = level.depass.abs().argsort(descending=True)[:k].tolist()
    return [level.components[i] for i in order]


class Run:
    """One prompt, one metric: the DePass scores and patching effects of each level."""

    def __init__(self, model: Model, tokens: Int[Tensor, "1 pos"],
                 corrupted: Int[Tensor, "1 pos"] | None, target: int, wrong: int | None, rule: str,
                 patch_limit: int = 512):
        self.model, self.tokens, self.corrupted, self.rule = model, tokens, corrupted, rule
        self.patch_limit = patch_limit
        self.target, self.wrong = target, wrong
        self.cache = model.run_with_cache(tokens)[1] if corrupted is not None else None
        self._corrupted: float | None = None

    def metric_rows(self, logits: Tensor) -> Tensor:
        return logit_diff_rows(logits, self.target, self.wrong)

    def metric(self, logits: Tensor) -> Tensor:
        return self.metric_rows(logits).mean()

    def corrupted_metric(self) -> float:
        if self._corrupted is None:
            with torch.no_grad():
                self._corrupted = self.metric(self.model(self.corrupted)).item()
        return self._corrupted

    def depass(self, spec, kinds: tuple[str, ...] | None = None) -> LevelScores:
        """DePass scores of the components of `spec` whose kind is in `kinds` (None: all)."""
        dec = decompose(self.model, self.tokens, spec, mlp_rule=self.rule, logits="all")
        scores = compare.metric_scores(self.model, dec, self.metric)
        keep = [i for i, label in enumerate(dec.component_labels) if kinds is None or label.kind in kinds]
        top = scores[keep].abs().argsort(descending=True)[:TOP].tolist()
        vocab = {dec.labels[keep[i]]: paths.vocabulary(self.model, dec.logits[keep[i], 0, -1])
                 for i in top}
        return LevelScores([dec.labels[i] for i in keep], scores[keep], completeness=worst_per_hook(dec),
                           components=[dec.component_labels[i] for i in keep],
                           corrupted_metric=None if self.corrupted is None else self.corrupted_metric(),
                           vocab=vocab)

    def positions(self) -> tuple[LevelScores, Tensor, Tensor | None]:
        """Each position's residual entering each layer (layer 0: the token level)."""
        n = self.tokens.shape[1]
        level = self.depass(TokensAt(0))
        rows = [level.depass[:n]] + [self.depass(TokensAt(layer)).depass[:n]
                                     for layer in range(1, self.model.cfg.n_layers)]
        by_layer, patched = torch.stack(rows), None
        if self.corrupted is not None:  # what transformer_lens.patching.get_act_patch_resid_pre does
            layers = range(self.model.cfg.n_layers)
            patched = self.patch([(resid_pre(layer), (p,)) for layer in layers for p in range(n)], 1)
            patched = patched.reshape(len(layers), n).to(by_layer)
            # Restoring position p's embedding restores token p's part; the bias has no site.
            level.patching = torch.cat([patched[0], patched.new_zeros(len(level.labels) - n)])
            # Agreement over every (layer, position), as transformer_lens.patching lays it out.
            level.pearson, level.spearman = correlation(by_layer, patched)
            differ = int((self.tokens != self.corrupted).sum())
            level.note = (f" (patching is 0 wherever the two prompts agree: {differ} of {n} "
                          "positions differ, so ranks are mostly ties)")
        return level, by_layer, patched

    def heads(self) -> LevelScores:
        level = self.depass(Heads(), ("head",))
        if self.corrupted is not None:  # as get_act_patch_attn_head_out_all_pos
            cfg = self.model.cfg
            _set_patching(level, self.patch([(attn_z(layer), (slice(None), h))
                                             for layer in range(cfg.n_layers)
                                             for h in range(cfg.n_heads)], 1))
        return level

    def modules(self) -> LevelScores:
        level = self.depass(Modules(), ("attn", "mlp"))
        if self.corrupted is not None:
            sites = [(block_hook(label.layer, f"hook_{label.kind}_out"), ())
                     for label in level.components]
            _set_patching(level, self.patch(sites))
        return level

    def neurons(self, layer: int) -> LevelScores:
        level = self.depass(Neurons(layer), ("neuron",))
        if self.corrupted is not None:
            # One patched forward per neuron: above `patch_limit` neurons, patch a random sample
            # (an unbiased estimate of the agreement over all of them, at a bounded cost).
            # The top 20 by DePass are patched too, for the tables; the sample alone is correlated.
            d_mlp, hook = self.model.cfg.d_mlp, block_hook(layer, "mlp.hook_post")
            chosen = list(range(d_mlp)) if d_mlp <= self.patch_limit else sorted(torch.randperm(
                d_mlp, generator=torch.Generator().manual_seed(0))[:self.patch_limit].tolist())
            top = level.depass.abs().argsort(descending=True)[:20].tolist()
            sites = sorted(set(chosen) | set(top))
            effect = self.patch([(hook, (Ellipsis, i)) for i in sites])
            level.patching = torch.full_like(level.depass, float("nan"))
            level.patching[sites] = effect.to(level.depass)
            level.pearson, level.spearman = correlation(level.depass[chosen], level.patching[chosen])
            if len(chosen) < d_mlp:
                level.note = f" (over {len(chosen)} of {d_mlp} neurons, sampled at random)"
        return level

    def patch(self, sites: list[tuple[str, tuple]], chunk: int = 64) -> Tensor:
        """metric(corrupted run with one clean activation restored) - metric(corrupted), for each
        site (hook, index into the activation after its batch axis), `chunk` sites per forward.
        chunk=1 is transformer_lens.patching's one forward per site, where a site that changes
        nothing gives exactly 0 (a batched forward rounds differently, and would break the ties)."""
        units = [Patch(hook, index, self.cache[hook]) for hook, index in sites]
        return patch_each(self.model, self.corrupted, units, self.metric, chunk) - self.corrupted_metric()


def _set_patching(level: LevelScores, effect: Tensor) -> None:
    level.patching = effect.to(level.depass)
    level.pearson, level.spearman = correlation(level.depass, level.patching)


def __getattr__(name: str):
    """The page is rendered by tl_depass.app.html (imported only when asked for: computing needs
    no plotly.js); `tl_depass.app.explain.write_html` keeps working."""
    if name in ("write_html", "render", "figures", "write_atomic", "NOTE", "STYLE"):
        from tl_depass.app import html

        return getattr(html, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
