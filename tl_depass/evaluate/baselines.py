"""The attributions DePass is measured against, shaped like DePass's own readouts.

Token level, for a target `answer_logprob` (the answer's log-probability at the last position):
scores are `[batch pos]`. Component level, for a scalar `metric` (logits -> one number, e.g. the
mean logit difference): heads are `[layer head_index]`, the neurons of one layer `[d_mlp]`.
Higher means "more important for the answer" for every method, so protocols rank all of them,
DePass included, in the same way.

Everything goes through hook names (`blocks.{l}.attn.hook_pattern`, `blocks.0.hook_resid_pre`,
`blocks.{l}.attn.hook_z`, `blocks.{l}.mlp.hook_post`) and `run_with_hooks`, so a
TransformerBridge with the same hook names works too. Hooks are added only inside TransformerLens'
context managers, so none is left on the model, also after an exception.
"""

from collections.abc import Callable

import einops
import torch
from jaxtyping import Float, Int
from torch import Tensor

from tl_depass.decompose import decompose
from tl_depass.errors import DepassError
from tl_depass.levels import Heads, Neurons
from tl_depass.optional import need

Metric = Callable[[Tensor], Tensor]  # logits [batch pos d_vocab] -> scalar
EMBED_HOOK = "blocks.0.hook_resid_pre"  # token (+ learned position) embedding: DePass's token entry


def answer_logprob(logits: Float[Tensor, "batch pos d_vocab"], answers: Int[Tensor, " batch"]
                   ) -> Float[Tensor, " batch"]:
    """log p(answer) at the last position: the token-level target of every method."""
    if answers.shape != logits.shape[:1]:
        raise DepassError(f"got {tuple(answers.shape)} answers for a batch of {logits.shape[0]} prompts: "
                          "pass one answer token id per prompt")
    return logits[:, -1].log_softmax(-1).gather(-1, answers[:, None].to(logits.device))[:, 0]


def logit_diff_metric(answers: Int[Tensor, " batch"], wrong: Int[Tensor, " batch"]) -> Metric:
    """Mean over the batch of logit(answer) - logit(wrong) at the last position."""
    def metric(logits: Tensor) -> Tensor:
        last = logits[:, -1]
        rows = torch.arange(last.shape[0], device=last.device)
        return (last[rows, answers] - last[rows, wrong]).mean()
    return metric


# --- token level: attention ---

def attention_patterns(model, tokens: Int[Tensor, "batch pos"]
                       ) -> Float[Tensor, "layer batch head_index query_pos key_pos"]:
    names = [f"blocks.{layer}.attn.hook_pattern" for layer in range(model.cfg.n_layers)]
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=names)
    return torch.stack([cache[n] for n in names])


def attention_mean(model, tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch pos"]:
    """Attention from the last position, averaged over all layers and heads."""
    return attention_patterns(model, tokens)[:, :, :, -1].mean((0, 2))


def attention_last_layer(model, tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch pos"]:
    """Attention from the last position in the last layer, averaged over heads."""
    return attention_patterns(model, tokens)[-1, :, :, -1].mean(1)


def rollout_matrix(model, tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch query_pos key_pos"]:
    """Attention rollout (Abnar & Zuidema 2020): per layer 0.5·A + 0.5·I with A the head-mean
    pattern, rows renormalised, multiplied from the first layer to the last."""
    patterns = attention_patterns(model, tokens).mean(2)  # [layer batch query key]
    eye = torch.eye(patterns.shape[-1], dtype=patterns.dtype, device=patterns.device)
    rollout = eye.expand_as(patterns[0])
    for a in patterns:
        a = 0.5 * a + 0.5 * eye
        rollout = (a / a.sum(-1, keepdim=True)) @ rollout
    return rollout


def attention_rollout(model, tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch pos"]:
    """The last position's row of the attention rollout."""
    return rollout_matrix(model, tokens)[:, -1]


# --- token level: gradients and occlusion ---

def replace_at(hook_name: str, value: Tensor) -> list:
    return [(hook_name, lambda x, hook: value)]


def embedding(model, tokens: Int[Tensor, "batch pos"], hook: str = EMBED_HOOK
              ) -> Float[Tensor, "batch pos d_model"]:
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=[hook])
    return cache[hook]


def embedding_gradient(model, tokens: Int[Tensor, "batch pos"], answers: Int[Tensor, " batch"],
                       hook: str = EMBED_HOOK
                       ) -> tuple[Float[Tensor, "batch pos d_model"], Float[Tensor, "batch pos d_model"]]:
    """The embedding at `hook` and the gradient of each row's answer log-prob with respect to it
    (rows are independent, so one backward of the sum gives every row's gradient)."""
    x = embedding(model, tokens, hook).detach().requires_grad_(True)
    with torch.enable_grad():
        logits = model.run_with_hooks(tokens, fwd_hooks=replace_at(hook, x))
        (grad,) = torch.autograd.grad(answer_logprob(logits, answers).sum(), x)
    return x.detach(), grad


def input_x_gradient(model, tokens: Int[Tensor, "batch pos"], answers: Int[Tensor, " batch"]
                     ) -> Float[Tensor, "batch pos"]:
    """Σ_d embedding · ∂ log p(answer) / ∂ embedding, per position."""
    x, grad = embedding_gradient(model, tokens, answers)
    return (x * grad).sum(-1)


def gradient_norm(model, tokens: Int[Tensor, "batch pos"], answers: Int[Tensor, " batch"]
                  ) -> Float[Tensor, "batch pos"]:
    """‖∂ log p(answer) / ∂ embedding‖₂ per position."""
    return embedding_gradient(model, tokens, answers)[1].norm(dim=-1)


def integrated_gradients(model, tokens: Int[Tensor, "batch pos"], answers: Int[Tensor, " batch"],
                         steps: int = 100, internal_batch_size: int | None = None,
                         return_delta: bool = False):
    """Captum's Integrated Gradients on the embedding (`blocks.0.hook_resid_pre`) from an
    all-zero embedding, target log p(answer); summed over d_model per position. With
    `return_delta`, also Captum's convergence delta (Σ attributions − (f(x) − f(0)), per row)."""
    IntegratedGradients = need("captum.attr", "integrated_gradients").IntegratedGradients

    def forward(x: Tensor, toks: Tensor) -> Tensor:
        return model.run_with_hooks(toks, fwd_hooks=replace_at(EMBED_HOOK, x))[:, -1].log_softmax(-1)

    x = embedding(model, tokens)
    ig = IntegratedGradients(forward)
    with torch.enable_grad():
        attr, delta = ig.attribute(x, baselines=torch.zeros_like(x), target=answers.tolist(),
                                   additional_forward_args=(tokens,), n_steps=steps,
                                   internal_batch_size=internal_batch_size or tokens.shape[0] * steps,
                                   return_convergence_delta=True)
    scores = attr.detach().sum(-1)
    return (scores, delta.detach()) if return_delta else scores


def delete_positions(tokens: Int[Tensor, "batch pos"], drop: Tensor) -> Int[Tensor, "batch kept"]:
    """`tokens` without the positions where `drop` ([batch pos] bool) is True; every row must drop
    the same number of positions."""
    counts = drop.sum(1)
    if not (counts == counts[0]).all():
        raise DepassError(f"every row must delete the same number of tokens, got {counts.tolist()}")
    return tokens[~drop].reshape(tokens.shape[0], -1)


def occlusion(model, tokens: Int[Tensor, "batch pos"], answers: Int[Tensor, " batch"],
              chunk: int = 16) -> Float[Tensor, "batch pos"]:
    """Leave-one-token-out: log p(answer) minus log p(answer) with position p's token deleted
    (the sequence gets one shorter). The last position predicts the answer and cannot be deleted:
    its score is NaN."""
    batch, n = tokens.shape
    with torch.no_grad():
        base = answer_logprob(model(tokens), answers)
        out = torch.full((batch, n), torch.nan, dtype=base.dtype, device=base.device)
        eye = torch.eye(n, dtype=torch.bool, device=tokens.device)
        for start in range(0, n - 1, chunk):
            ps = range(start, min(start + chunk, n - 1))
            shorter = torch.cat([delete_positions(tokens, eye[p].expand(batch, n)) for p in ps])
            logp = answer_logprob(model(shorter), answers.repeat(len(ps)))
            out[:, start:start + len(ps)] = (base - logp.reshape(len(ps), batch)).T
    return out


# --- component level ---

HEAD_HOOK, NEURON_HOOK = "blocks.{}.attn.hook_z", "blocks.{}.mlp.hook_post"


def unit_sum(x: Tensor, hook_name: str) -> Tensor:
    """Sum over batch, position (and d_head): one value per head or neuron."""
    if hook_name.endswith("hook_z"):
        return einops.reduce(x, "batch pos head d_head -> head", "sum")
    return einops.reduce(x, "batch pos d_mlp -> d_mlp", "sum")


def activations_and_gradients(model, tokens: Int[Tensor, "batch pos"], metric: Metric,
                              names: list[str]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Clean activations at `names` and the gradient of `metric` with respect to each (a zero
    tensor is added at each hook, so gradients flow through every later site: total derivatives)."""
    acts, deltas = {}, {}

    def add_delta(x: Tensor, hook, name: str) -> Tensor:
        # keyed by the name we registered: on a TransformerBridge `hook.name` can be an alias
        acts[name] = x.detach()
        deltas[name] = torch.zeros_like(x, requires_grad=True)
        return x + deltas[name]

    with torch.enable_grad():
        logits = model.run_with_hooks(
            tokens, fwd_hooks=[(n, lambda x, hook, n=n: add_delta(x, hook, n)) for n in names])
        grads = torch.autograd.grad(metric(logits), [deltas[n] for n in names])
    return {n: acts[n] for n in names}, dict(zip(names, grads, strict=True))


def layer_names(model, level: str, layer: int | None) -> list[str]:
    if level == "heads":
        return [HEAD_HOOK.format(i) for i in range(model.cfg.n_layers)]
    if level == "neurons" and layer is not None:
        return [NEURON_HOOK.format(layer)]
    raise DepassError(f"level must be 'heads' or 'neurons' (with a layer), got {level!r}, {layer}")


def check_corrupted(tokens: Tensor, corrupted: Tensor | None) -> None:
    if corrupted is not None and corrupted.shape != tokens.shape:
        raise DepassError(f"corrupted tokens are {tuple(corrupted.shape)} but tokens are "
                          f"{tuple(tokens.shape)}: pass one corrupted prompt of the same length per prompt")


def cached(model, tokens: Int[Tensor, "batch pos"], names: list[str]) -> dict[str, Tensor]:
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=names)
    return {n: cache[n] for n in names}


def attribution_patching(model, tokens: Int[Tensor, "batch pos"], metric: Metric, level: str = "heads",
                         layer: int | None = None, corrupted: Tensor | None = None,
                         absolute: bool = True) -> Tensor:
    """Attribution patching (Nanda 2023; Syed et al. 2023): (a − a_ref) · ∂metric/∂a at the clean
    run, summed over batch and positions, with a_ref the corrupted run's activation (or zero).
    It is the first-order Taylor estimate of metric(clean) − metric(a patched to a_ref).
    `absolute=True` returns its magnitude (the usual ranking). Heads: [layer head_index];
    neurons of `layer`: [d_mlp]."""
    names = layer_names(model, level, layer)
    check_corrupted(tokens, corrupted)
    acts, grads = activations_and_gradients(model, tokens, metric, names)
    refs = cached(model, corrupted, names) if corrupted is not None else {
        n: torch.zeros_like(a) for n, a in acts.items()}
    scores = torch.stack([unit_sum((acts[n] - refs[n]) * grads[n], n) for n in names])
    scores = scores.abs() if absolute else scores
    return scores if level == "heads" else scores[0]


def activation_norm(model, tokens: Int[Tensor, "batch pos"], level: str = "heads",
                    layer: int | None = None) -> Tensor:
    """‖activation‖₂ over positions (and d_head), averaged over the batch: each head's z, or each
    neuron's activation. Heads: [layer head_index]; neurons: [d_mlp]."""
    names = layer_names(model, level, layer)
    acts = cached(model, tokens, names)
    if level == "heads":
        return torch.stack([acts[n].pow(2).sum((1, 3)).sqrt().mean(0) for n in names])
    return acts[names[0]].pow(2).sum(1).sqrt().mean(0)


def neuron_activation(model, tokens: Int[Tensor, "batch pos"], layer: int) -> Float[Tensor, " d_mlp"]:
    """The raw (signed) activation of each neuron of `layer` at the last position, batch mean."""
    name = NEURON_HOOK.format(layer)
    return cached(model, tokens, [name])[name][:, -1].mean(0)


def random_scores(shape: tuple[int, ...], seed: int = 0) -> Tensor:
    """Uniform random scores: the ranking any method has to beat."""
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def activation_patching(model, tokens: Int[Tensor, "batch pos"], metric: Metric, level: str = "heads",
                        layer: int | None = None, corrupted: Tensor | None = None,
                        chunk: int = 64) -> Tensor:
    """Exact patching, the causal reference: metric(clean) − metric(clean run with ONE head's z,
    or one neuron's activation, replaced by its corrupted-run value, or by zero when `corrupted`
    is None: zero-ablation), everything downstream free. Several units ride in one forward as
    copies of the batch. Heads: [layer head_index]; neurons: [d_mlp]."""
    names = layer_names(model, level, layer)
    check_corrupted(tokens, corrupted)
    batch = tokens.shape[0]
    with torch.no_grad():
        base = metric(model(tokens))
        refs = cached(model, corrupted, names) if corrupted is not None else None
        rows = []
        for name in names:
            n_units = model.cfg.n_heads if level == "heads" else model.cfg.d_mlp
            effects = []
            for start in range(0, n_units, chunk):
                k = min(chunk, n_units - start)
                unit = torch.zeros(k, n_units, dtype=torch.bool, device=tokens.device)
                unit[torch.arange(k), torch.arange(start, start + k)] = True
                mask = unit[:, None, None, :, None] if level == "heads" else unit[:, None, None, :]

                def patch(x: Tensor, hook, mask=mask, k=k, name=name) -> Tensor:
                    folded = x.reshape(k, batch, *x.shape[1:])
                    ref = refs[name] if refs is not None else torch.zeros_like(folded[0])
                    return torch.where(mask, ref, folded).reshape(x.shape)

                logits = model.run_with_hooks(tokens.repeat(k, 1), fwd_hooks=[(name, patch)])
                effects += [base - metric(part) for part in logits.reshape(k, batch, *logits.shape[1:])]
            rows.append(torch.stack(effects))
    return torch.stack(rows) if level == "heads" else rows[0]


# --- DePass as one more method ---

def depass_tokens(model, tokens: Int[Tensor, "batch pos"], answers: Int[Tensor, " batch"],
                  mlp_rule: str = "softmax", bos: int | None = None) -> Float[Tensor, "batch pos"]:
    """Each token's share of the answer's log-probability, linearised at the clean logits:
    logit_c[answer] − Σ_v p_v logit_c[v] (the shares sum to log p(answer) + log Z − Σ p_v
    logit_v, the part of the log-prob that is linear in the logits). `bos`: the BOS id for the
    paper's special-token rule (None: the tokenizer's)."""
    dec = decompose(model, tokens, mlp_rule=mlp_rule, keep=[],
                    ignore_bos=True if bos is None else bos)
    last = dec.logits[:, :, -1]  # [component batch d_vocab]
    probs = dec.clean_logits[:, -1].softmax(-1).to(last)
    rows = torch.arange(tokens.shape[0])
    score = last[:, rows, answers] - einops.einsum(last, probs, "c b v, b v -> c b")
    return score[: tokens.shape[1]].T  # drop the bias component


def depass_heads(model, tokens: Int[Tensor, "batch pos"], answers: Int[Tensor, " batch"],
                 wrong: Int[Tensor, " batch"], mlp_rule: str = "softmax"
                 ) -> Float[Tensor, "layer head_index"]:
    """Each head's total effect on the logit difference (answer − wrong), batch mean."""
    dec = decompose(model, tokens, Heads(), mlp_rule=mlp_rule, keep=[])
    return dec.head_scores(answers, wrong).mean(0)


def depass_neurons(model, tokens: Int[Tensor, "batch pos"], answers: Int[Tensor, " batch"],
                   wrong: Int[Tensor, " batch"], layer: int, mlp_rule: str = "softmax"
                   ) -> Float[Tensor, " d_mlp"]:
    """Each neuron of `layer`: its total effect on the logit difference, batch mean."""
    dec = decompose(model, tokens, Neurons(layer), mlp_rule=mlp_rule, keep=[])
    return dec.neuron_scores(answers, wrong).mean(0)[layer]


__all__ = [
    "EMBED_HOOK", "Metric", "activation_norm", "activation_patching", "answer_logprob",
    "attention_last_layer", "attention_mean", "attention_patterns", "attention_rollout",
    "attribution_patching", "delete_positions", "depass_heads", "depass_neurons", "depass_tokens",
    "embedding", "embedding_gradient", "gradient_norm", "input_x_gradient", "integrated_gradients",
    "logit_diff_metric", "neuron_activation", "occlusion", "random_scores", "rollout_matrix",
]
