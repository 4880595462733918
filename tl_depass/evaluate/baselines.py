"""The attributions DePass is measured against, shaped like DePass's own readouts.

Token level, for a target `answer_logprob` (the answer's log-probability at the last position):
scores are `[batch pos]`. Component level, for a scalar `metric` (logits -> one number, e.g. the
mean logit difference): heads are `[layer head_index]`, the neurons of one layer `[d_mlp]`.
Higher means "more important for the answer" for every method, so protocols rank all of them,
DePass included, in the same way.

Component-level methods take the level as an object: `Heads()` (every head of every layer, or
`Heads(layers=...)`) or `Neurons(layer)` (every neuron of one layer); the old `"heads"` /
`("neurons", layer)` strings still work, with a DeprecationWarning.

Everything goes through hook names (`blocks.{l}.attn.hook_pattern`, `blocks.0.hook_resid_pre`,
`blocks.{l}.attn.hook_z`, `blocks.{l}.mlp.hook_post`) and `tl_depass.evaluate.patch`, so a
TransformerBridge with the same hook names works too. Hooks are added only inside TransformerLens'
context managers, so none is left on the model, also after an exception.
"""

import warnings

import einops
import torch
from jaxtyping import Float, Int
from torch import Tensor

from tl_depass.decompose import decompose
from tl_depass.engine.backends import Model
from tl_depass.engine.hooks import block_hook, resid_pre
from tl_depass.errors import DepassError
from tl_depass.evaluate import patch
from tl_depass.evaluate.metrics import Metric, logit_diff
from tl_depass.evaluate.unit_baselines import (  # noqa: F401  (the component-level baselines)
    activation_norm,
    activation_patching,
    activations_and_gradients,
    attribution_patching,
    cached,
    check_corrupted,
    neuron_activation,
    random_scores,
    unit_sum,
)
from tl_depass.levels import Heads, Neurons
from tl_depass.optional import need

EMBED_HOOK = resid_pre(0)  # token (+ learned position) embedding: DePass's token entry


def answer_logprob(logits: Float[Tensor, "batch pos d_vocab"], answers: Int[Tensor, " batch"]
                   ) -> Float[Tensor, " batch"]:
    """log p(answer) at the last position: the token-level target of every method."""
    if answers.shape != logits.shape[:1]:
        raise DepassError(f"got {tuple(answers.shape)} answers for a batch of {logits.shape[0]} prompts: "
                          "pass one answer token id per prompt")
    return logits[:, -1].log_softmax(-1).gather(-1, answers[:, None].to(logits.device))[:, 0]


def logit_diff_metric(answers: Int[Tensor, " batch"], wrong: Int[Tensor, " batch"]) -> Metric:
    """Mean over the batch of logit(answer) - logit(wrong) at the last position
    (`tl_depass.evaluate.metrics.logit_diff`)."""
    return logit_diff(answers, wrong)


# --- token level: attention ---

def attention_patterns(model: Model, tokens: Int[Tensor, "batch pos"]
                       ) -> Float[Tensor, "layer batch head_index query_pos key_pos"]:
    names = [block_hook(layer, "attn.hook_pattern") for layer in range(model.cfg.n_layers)]
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=names)
    return torch.stack([cache[n] for n in names])


def attention_mean(model: Model, tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch pos"]:
    """Attention from the last position, averaged over all layers and heads."""
    return attention_patterns(model, tokens)[:, :, :, -1].mean((0, 2))


def attention_last_layer(model: Model, tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch pos"]:
    """Attention from the last position in the last layer, averaged over heads."""
    return attention_patterns(model, tokens)[-1, :, :, -1].mean(1)


def rollout_matrix(model: Model, tokens: Int[Tensor, "batch pos"]
                   ) -> Float[Tensor, "batch query_pos key_pos"]:
    """Attention rollout (Abnar & Zuidema 2020): per layer 0.5·A + 0.5·I with A the head-mean
    pattern, rows renormalised, multiplied from the first layer to the last."""
    patterns = attention_patterns(model, tokens).mean(2)  # [layer batch query key]
    eye = torch.eye(patterns.shape[-1], dtype=patterns.dtype, device=patterns.device)
    rollout = eye.expand_as(patterns[0])
    for a in patterns:
        a = 0.5 * a + 0.5 * eye
        rollout = (a / a.sum(-1, keepdim=True)) @ rollout
    return rollout


def attention_rollout(model: Model, tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch pos"]:
    """The last position's row of the attention rollout."""
    return rollout_matrix(model, tokens)[:, -1]


# --- token level: gradients and occlusion ---

def embedding(model: Model, tokens: Int[Tensor, "batch pos"], hook: str = EMBED_HOOK
              ) -> Float[Tensor, "batch pos d_model"]:
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=[hook])
    return cache[hook]


def embedding_gradient(model: Model, tokens: Int[Tensor, "batch pos"], answers: Int[Tensor, " batch"],
                       hook: str = EMBED_HOOK
                       ) -> tuple[Float[Tensor, "batch pos d_model"], Float[Tensor, "batch pos d_model"]]:
    """The embedding at `hook` and the gradient of each row's answer log-prob with respect to it
    (rows are independent, so one backward of the sum gives every row's gradient)."""
    x = embedding(model, tokens, hook).detach().requires_grad_(True)
    with torch.enable_grad():
        logits = patch.run(model, tokens, [patch.Patch(hook, (), x)])
        (grad,) = torch.autograd.grad(answer_logprob(logits, answers).sum(), x)
    return x.detach(), grad


def input_x_gradient(model: Model, tokens: Int[Tensor, "batch pos"], answers: Int[Tensor, " batch"]
                     ) -> Float[Tensor, "batch pos"]:
    """Σ_d embedding · ∂ log p(answer) / ∂ embedding, per position."""
    x, grad = embedding_gradient(model, tokens, answers)
    return (x * grad).sum(-1)


def gradient_norm(model: Model, tokens: Int[Tensor, "batch pos"], answers: Int[Tensor, " batch"]
                  ) -> Float[Tensor, "batch pos"]:
    """‖∂ log p(answer) / ∂ embedding‖₂ per position."""
    return embedding_gradient(model, tokens, answers)[1].norm(dim=-1)


def integrated_gradients_with_delta(model: Model, tokens: Int[Tensor, "batch pos"],
                                   answers: Int[Tensor, " batch"], steps: int = 100,
                                   internal_batch_size: int | None = None
                                   ) -> tuple[Float[Tensor, "batch pos"], Float[Tensor, " batch"]]:
    """`integrated_gradients` and Captum's convergence delta (Σ attributions − (f(x) − f(0)),
    per row)."""
    IntegratedGradients = need("captum.attr", "integrated_gradients").IntegratedGradients

    def forward(x: Tensor, toks: Tensor) -> Tensor:
        return patch.run(model, toks, [patch.Patch(EMBED_HOOK, (), x)])[:, -1].log_softmax(-1)

    x = embedding(model, tokens)
    ig = IntegratedGradients(forward)
    with torch.enable_grad():
        attr, delta = ig.attribute(x, baselines=torch.zeros_like(x), target=answers.tolist(),
                                   additional_forward_args=(tokens,), n_steps=steps,
                                   internal_batch_size=internal_batch_size or tokens.shape[0] * steps,
                                   return_convergence_delta=True)
    return attr.detach().sum(-1), delta.detach()


def integrated_gradients(model: Model, tokens: Int[Tensor, "batch pos"],
                         answers: Int[Tensor, " batch"], steps: int = 100,
                         internal_batch_size: int | None = None, return_delta: bool | None = None
                         ) -> Float[Tensor, "batch pos"] | tuple[Float[Tensor, "batch pos"],
                                                                Float[Tensor, " batch"]]:
    """Captum's Integrated Gradients on the embedding (`blocks.0.hook_resid_pre`) from an
    all-zero embedding, target log p(answer); summed over d_model per position.
    `integrated_gradients_with_delta` also returns the convergence delta (`return_delta=True`
    still does, deprecated)."""
    if return_delta is not None:
        warnings.warn("integrated_gradients(return_delta=) is deprecated: call "
                      "integrated_gradients_with_delta for (scores, delta)", DeprecationWarning,
                      stacklevel=2)
    scores, delta = integrated_gradients_with_delta(model, tokens, answers, steps, internal_batch_size)
    return (scores, delta) if return_delta else scores


def delete_positions(tokens: Int[Tensor, "batch pos"], drop: Tensor) -> Int[Tensor, "batch kept"]:
    """`tokens` without the positions where `drop` ([batch pos] bool) is True; every row must drop
    the same number of positions."""
    counts = drop.sum(1)
    if not (counts == counts[0]).all():
        raise DepassError(f"every row must delete the same number of tokens, got {counts.tolist()}")
    return tokens[~drop].reshape(tokens.shape[0], -1)


def occlusion(model: Model, tokens: Int[Tensor, "batch pos"], answers: Int[Tensor, " batch"],
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


# --- DePass as one more method ---

def depass_tokens(model: Model, tokens: Int[Tensor, "batch pos"], answers: Int[Tensor, " batch"],
                  mlp_rule: str = "softmax", bos: int | None = None) -> Float[Tensor, "batch pos"]:
    """Each token's share of the answer's log-probability, linearised at the clean logits:
    logit_c[answer] − Σ_v p_v logit_c[v] (the shares sum to log p(answer) + log Z − Σ p_v
    logit_v, the part of the log-prob that is linear in the logits). `bos`: the BOS id for the
    paper's special-token rule (None: the tokenizer's)."""
    dec = decompose(model, tokens, mlp_rule=mlp_rule, keep=[],
                    ignore_bos=True if bos is None else bos)
    last = dec.logits  # [component batch d_vocab]: logits="last" (no padding: position -1)
    probs = dec.clean_logits[:, -1].softmax(-1).to(last)
    rows = torch.arange(tokens.shape[0])
    score = last[:, rows, answers] - einops.einsum(last, probs, "c b v, b v -> c b")
    return score[: tokens.shape[1]].T  # drop the bias component


def depass_heads(model: Model, tokens: Int[Tensor, "batch pos"], answers: Int[Tensor, " batch"],
                 wrong: Int[Tensor, " batch"], mlp_rule: str = "softmax"
                 ) -> Float[Tensor, "layer head_index"]:
    """Each head's total effect on the logit difference (answer − wrong), batch mean."""
    dec = decompose(model, tokens, Heads(), mlp_rule=mlp_rule, keep=[])
    return dec.head_scores(answers, wrong).mean(0)


def depass_neurons(model: Model, tokens: Int[Tensor, "batch pos"], answers: Int[Tensor, " batch"],
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
    "integrated_gradients_with_delta",
    "logit_diff_metric", "neuron_activation", "occlusion", "random_scores", "rollout_matrix",
]
