"""Every method through every protocol on one model and one task batch.

A task batch has `tokens [batch pos]` (BOS first), `answers [batch]` and `wrong [batch]` (the
answer and a competitor at the last position), `corrupted [batch pos]` and `key_positions
[batch pos]` (the positions that truly matter), as `tl_depass.models.tasks.generate` returns them.
Real text (`tl_depass.evaluate.completions.make`) has no ground truth: `key_positions` is None,
and the hit rate and its chance level are NaN ("not defined").
"""

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import pandas as pd
import torch
from torch import Tensor
from tqdm.auto import tqdm

from tl_depass.engine.backends import Model
from tl_depass.evaluate import baselines as B
from tl_depass.evaluate import components as C
from tl_depass.evaluate import tokens as T
from tl_depass.evaluate.metrics import logit_diff
from tl_depass.evaluate.unit_levels import UnitLevel, as_level
from tl_depass.levels import Heads, Neurons

RANDOM_DRAWS = 20  # unit-level "random" is the mean over this many random rankings
PROMPTS_PER_PASS = 64  # DePass runs on this many prompts at a time (bounds the folded batch's memory)


def by_prompts(fn: Callable[..., Tensor], *per_prompt: Tensor, mean: bool) -> Tensor:
    """`fn` on chunks of PROMPTS_PER_PASS prompts: the chunks' outputs concatenated over prompts
    ([batch ...] outputs), or their prompt-weighted mean (batch-mean outputs)."""
    n = per_prompt[0].shape[0]
    parts = [(fn(*(x[i:i + PROMPTS_PER_PASS] for x in per_prompt)), min(PROMPTS_PER_PASS, n - i))
             for i in range(0, n, PROMPTS_PER_PASS)]
    if mean:
        return sum(out * size for out, size in parts) / n
    return torch.cat([out for out, _ in parts])


@dataclass
class Result:
    """Tables (pandas) and curves of one model on one task."""

    model: str
    tokens: pd.DataFrame | None = None  # method, disrupt_aopc, recover_aopc, area_between, hit_rate, seconds
    curves: dict[str, dict[str, Tensor]] = field(default_factory=dict)  # method -> disrupt/recover
    chance_hit_rate: float = float("nan")  # NaN: no key positions (real text), not defined
    clean: dict[str, float] = field(default_factory=dict)  # accuracy, logit_diff
    heads: dict[str, pd.DataFrame] = field(default_factory=dict)  # ablation, correlation, seconds
    neurons: dict[int, dict[str, pd.DataFrame]] = field(default_factory=dict)  # per layer, as heads
    # "heads" or "L1 neurons" -> method -> scores
    scores: dict[str, dict[str, Tensor]] = field(default_factory=dict)
    seconds: float = 0.0


def timed(fn: Callable[[], Tensor]) -> tuple[Tensor, float]:
    start = time.perf_counter()
    out = fn()
    return out.detach().to(torch.float64).cpu(), time.perf_counter() - start


def token_methods(model: Model, batch, seed: int = 0) -> dict[str, Callable[[], Tensor]]:
    tokens, answers = batch.tokens, batch.answers
    bos = int(tokens[0, 0])
    return {
        "DePass (softmax)": lambda: by_prompts(lambda t, a: B.depass_tokens(model, t, a, "softmax", bos),
                                               tokens, answers, mean=False),
        "DePass (ratio)": lambda: by_prompts(lambda t, a: B.depass_tokens(model, t, a, "ratio", bos),
                                             tokens, answers, mean=False),
        "Integrated Gradients": lambda: B.integrated_gradients(
            model, tokens, answers, internal_batch_size=max(tokens.shape[0], 2048 // tokens.shape[1])),
        "input x gradient": lambda: B.input_x_gradient(model, tokens, answers),
        "gradient norm": lambda: B.gradient_norm(model, tokens, answers),
        "occlusion (leave one out)": lambda: B.occlusion(model, tokens, answers),
        "attention (mean)": lambda: B.attention_mean(model, tokens),
        "attention (last layer)": lambda: B.attention_last_layer(model, tokens),
        "attention rollout": lambda: B.attention_rollout(model, tokens),
        "random": lambda: B.random_scores(tuple(tokens.shape), seed),
    }


def evaluate_tokens(model: Model, batch, result: Result, seed: int = 0) -> None:
    rows = []
    key = getattr(batch, "key_positions", None)  # None on real text: hit rate not defined
    methods = token_methods(model, batch, seed)
    for name, fn in tqdm(methods.items(), desc=f"{result.model}: tokens", leave=False):
        scores, seconds = timed(fn)
        curves = T.deletion_curves(model, batch.tokens, batch.answers, scores.to(batch.tokens.device))
        result.curves[name] = {k: v.mean(1).cpu() for k, v in curves.items()}
        rows.append({"method": name, **T.summarise(curves),
                     "hit_rate": float("nan") if key is None else T.hit_rate(scores, key.cpu()),
                     "seconds": seconds})
    result.tokens = pd.DataFrame(rows)
    result.chance_hit_rate = float("nan") if key is None else T.chance_hit_rate(key)


def unit_methods(model: Model, batch, level: UnitLevel, seed: int = 0
                 ) -> dict[str, Callable[[], Tensor]]:
    tokens, answers, wrong, corrupted = batch.tokens, batch.answers, batch.wrong, batch.corrupted
    metric = logit_diff(answers, wrong)
    heads = isinstance(level, Heads)
    shape = ((model.cfg.n_layers, model.cfg.n_heads) if heads else (model.cfg.d_mlp,))
    def depass(rule: str) -> Callable[[], Tensor]:
        if heads:
            def fn(t, a, w):
                return B.depass_heads(model, t, a, w, rule)
        else:
            def fn(t, a, w):
                return B.depass_neurons(model, t, a, w, level.layer, rule)
        return lambda: by_prompts(fn, tokens, answers, wrong, mean=True)
    methods = {
        "DePass (softmax)": depass("softmax"),
        "DePass (ratio)": depass("ratio"),
        "|AtP| vs zero": lambda: B.attribution_patching(model, tokens, metric, level),
        "|AtP| vs corrupted": lambda: B.attribution_patching(model, tokens, metric, level,
                                                             corrupted=corrupted),
        "AtP vs zero (signed)": lambda: B.attribution_patching(model, tokens, metric, level,
                                                               absolute=False),
        "activation norm": lambda: B.activation_norm(model, tokens, level),
    }
    if not heads:
        methods["raw activation"] = lambda: B.neuron_activation(model, tokens, level.layer)
    methods["random"] = lambda: torch.stack([B.random_scores(shape, seed + i) for i in range(RANDOM_DRAWS)])
    return methods


def evaluate_units(model: Model, batch, level: "UnitLevel | str", layer: int | None = None,
                   seed: int = 0) -> tuple[dict[str, pd.DataFrame], dict[str, Tensor]]:
    """Score every unit with every method, then ablate and correlate. The exact references
    (zero-ablation and corrupted patching, one forward per unit) are ranked too, as a bar no
    cheap method is expected to clear. "random" is averaged over RANDOM_DRAWS rankings."""
    level = as_level(level, layer)
    metric = logit_diff(batch.answers, batch.wrong)
    scores, seconds = {}, {}
    methods = unit_methods(model, batch, level, seed)
    methods["exact zero-ablation"] = lambda: B.activation_patching(model, batch.tokens, metric, level)
    methods["exact patching (corrupted)"] = lambda: B.activation_patching(
        model, batch.tokens, metric, level, corrupted=batch.corrupted)
    what = "heads" if isinstance(level, Heads) else f"L{level.layer} neurons"
    for name, fn in tqdm(methods.items(), desc=f"{what}: scores", leave=False):
        scores[name], seconds[name] = timed(fn)
    device = batch.tokens.device
    args = (model, batch.tokens, batch.answers, batch.wrong)
    draws = scores.pop("random")
    ablation = C.ablation_table(*args, {k: v.to(device) for k, v in scores.items()}, level)
    random_rows = pd.concat([C.ablation_table(*args, {"random": d.to(device)}, level)
                             for d in draws])
    random_rows = random_rows.groupby(["method", "k", "percent", "ablated"], as_index=False,
                                      sort=False).mean()
    ablation = pd.concat([ablation, random_rows], ignore_index=True)
    corr = []
    for ref in ("exact zero-ablation", "exact patching (corrupted)"):
        table = C.correlations(scores, scores[ref])
        rnd = pd.concat([C.correlations({"random": d}, scores[ref]) for d in draws])
        table = pd.concat([table, rnd.groupby("method", as_index=False).mean()], ignore_index=True)
        table.insert(1, "reference", ref)
        corr.append(table[table.method != ref])
    correlation = pd.concat(corr, ignore_index=True)
    correlation["seconds"] = correlation.method.map(seconds)
    scores["random"] = draws[0]
    frames = {"ablation": ablation, "correlation": correlation,
              "seconds": pd.DataFrame({"method": list(seconds), "seconds": list(seconds.values())})}
    return frames, scores


def mlp_layers(model: Model) -> list[int]:
    return [] if model.cfg.attn_only else list(range(model.cfg.n_layers))


def evaluate(model: Model, batch, name: str, neuron_layers: list[int] | None = None, seed: int = 0
             ) -> Result:
    """Every protocol on one model and task batch (neurons: every MLP layer by default)."""
    start = time.perf_counter()
    result = Result(name)
    with torch.no_grad():
        result.clean = C.task_metrics(model(batch.tokens), batch.answers, batch.wrong)
    evaluate_tokens(model, batch, result, seed)
    result.heads, result.scores["heads"] = evaluate_units(model, batch, Heads(), seed=seed)
    for layer in mlp_layers(model) if neuron_layers is None else neuron_layers:
        result.neurons[layer], result.scores[f"L{layer} neurons"] = evaluate_units(
            model, batch, Neurons(layer), seed=seed)
    result.seconds = time.perf_counter() - start
    return result
