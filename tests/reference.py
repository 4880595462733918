"""Independent reference DePass: plain tensor maths on the weights, no hooks in the decomposed pass.

Token-level components (`components="tokens"`, `pos_embed="with_token"`, no padding) for two
HookedTransformer families: GPT-2-like (LayerNorm, learned positions, MLP) and Llama-like
(RMSNorm, rotary, grouped-query attention, gated MLP). The clean run is read once with
`run_with_cache`; the rules are those of docs/rules.md. Written to be obviously correct, not fast.

`frozen_forward` is the single-stream counterpart: the model with every nonlinearity frozen at its
clean value and the MLPs linearised with the ratio rule. The ratio-rule shares are exactly its
linear part, which is what tests/test_reference.py checks.
"""

from typing import Literal

import pytest
import torch
from einops import einsum
from jaxtyping import Bool, Float
from torch import Tensor

from tl_depass.engine.backends import hooked_class

if hooked_class() is None:  # whichever test module imports this first skips, whatever its import order
    pytest.skip("the reference DePass runs on HookedTransformer, which TransformerLens 4 removed "
                "(the Bridge tests cover this version)", allow_module_level=True)

from transformer_lens import ActivationCache, HookedTransformer  # noqa: E402
from transformer_lens.components import LayerNorm, RMSNorm  # noqa: E402

Rule = Literal["softmax", "max", "ratio"]
LAYER_HOOKS = ("hook_resid_pre", "hook_attn_out", "hook_resid_mid", "hook_mlp_out",
               "hook_resid_post")


def check_supported(model: HookedTransformer) -> None:
    cfg = model.cfg
    problems = [
        name for name, bad in [
            ("normalization_type must be LN or RMS", cfg.normalization_type not in ("LN", "RMS")),
            ("positional_embedding_type must be standard or rotary",
             cfg.positional_embedding_type not in ("standard", "rotary")),
            ("attn_only", cfg.attn_only), ("parallel_attn_mlp", cfg.parallel_attn_mlp),
            ("use_normalization_before_and_after", cfg.use_normalization_before_and_after),
            ("post_embedding_ln", cfg.post_embedding_ln), ("solu_ln", cfg.act_fn == "solu_ln"),
            ("num_experts", bool(cfg.num_experts)),
            ("clip_qkv", bool(getattr(cfg, "clip_qkv", None))),
        ] if bad
    ]
    if problems:
        raise ValueError(f"reference_depass does not support: {', '.join(problems)}")


def act_slope_at_zero(act_fn) -> Tensor:
    """act'(0) by autograd (gelu, gelu_new, silu: 0.5; relu: 0, autograd's choice)."""
    with torch.enable_grad():
        x = torch.zeros((), dtype=torch.float64, requires_grad=True)
        return torch.autograd.grad(act_fn(x), x)[0].detach()


def apply_norm(norm, x: Float[Tensor, "component batch pos d_model"],
               scale: Float[Tensor, "batch pos 1"]) -> Float[Tensor, "component batch pos d_model"]:
    """Each component normalised with the clean scale; the norm's bias goes to the bias one."""
    if isinstance(norm, LayerNorm):
        out = (x - x.mean(-1, keepdim=True)) / scale * norm.w
        out[-1] += norm.b
        return out
    if isinstance(norm, RMSNorm):
        return x / scale * norm.w
    raise ValueError(f"unsupported norm {type(norm).__name__}")


def split_activation(
    g: Float[Tensor, "component batch pos d_mlp"], a: Float[Tensor, "batch pos d_mlp"],
    excluded: Bool[Tensor, "component batch pos"], rule: Literal["softmax", "max"],
    temperature: float,
) -> Float[Tensor, "component batch pos d_mlp"]:
    """Divide the clean activation `a` among the contributors: components with g != 0 that are not
    excluded (the bias component, last, competes like any other). No contributor: all to bias."""
    contributes = (g != 0) & ~excluded[..., None]
    masked = torch.where(contributes, g, torch.tensor(-torch.inf, dtype=g.dtype))
    if rule == "softmax":
        weights = torch.softmax(masked / temperature, dim=0)
    else:  # argmax returns the first maximum: ties go to the lowest component index
        winner = masked.argmax(0)
        weights = torch.nn.functional.one_hot(winner, g.shape[0]).movedim(-1, 0).to(g.dtype)
    all_to_bias = torch.zeros_like(weights)
    all_to_bias[-1] = 1.0
    weights = torch.where(contributes.any(0), weights, all_to_bias)
    return weights * a


@torch.no_grad()
def reference_depass(
    model: HookedTransformer, tokens: Tensor, rule: Rule = "softmax", temperature: float = 0.1,
    ignore_bos: bool = True, bos_token_id: int | None = None,
) -> dict[str, Tensor]:
    """Token-level DePass. Returns, for every layer, the LAYER_HOOKS residual-stream hooks,
    `mlp.hook_pre` (g: each component's part of the (gate) pre-activation) and `mlp.hook_post`,
    plus "logits" (pre-softcap), each `[component, batch, pos, ...]` with component p = token p
    (p < n_pos) and the bias component last.

    bos_token_id: the id that `ignore_bos` looks for at position 0; None means
    `model.tokenizer.bos_token_id` when the model has a tokenizer, else no BOS."""
    check_supported(model)
    if rule not in ("softmax", "max", "ratio"):
        raise ValueError(f"unknown rule {rule!r}")
    if bos_token_id is None and model.tokenizer is not None:
        bos_token_id = model.tokenizer.bos_token_id
    _, cache = model.run_with_cache(tokens)
    batch, n_pos = tokens.shape
    n_comp = n_pos + 1  # tokens, then bias

    # ignore_bos: token 0's component does not compete for MLP activations at positions > 0.
    excluded = torch.zeros(n_comp, batch, n_pos, dtype=torch.bool)
    if ignore_bos and rule != "ratio" and bos_token_id is not None:
        excluded[0, :, 1:] = (tokens[:, 0] == bos_token_id)[:, None]

    # Entry: token p holds the clean resid_pre (embedding + W_pos[p]) at position p.
    clean_entry = cache["blocks.0.hook_resid_pre"]
    x = torch.zeros(n_comp, batch, n_pos, model.cfg.d_model, dtype=clean_entry.dtype)
    for p in range(n_pos):
        x[p, :, p] = clean_entry[:, p]

    out: dict[str, Tensor] = {}
    for layer, block in enumerate(model.blocks):
        name = f"blocks.{layer}"
        out[f"{name}.hook_resid_pre"] = x

        # Attention: clean pattern frozen; b_V and b_O to the bias component. W_V / b_V are
        # TL's properties, already repeated from the key/value heads for GQA.
        attn = block.attn
        n = apply_norm(block.ln1, x, cache[f"{name}.ln1.hook_scale"])
        v = einsum(n, attn.W_V, "c b p d, h d e -> c b p h e")
        v[-1] += attn.b_V
        pattern = cache[f"{name}.attn.hook_pattern"]
        z = einsum(pattern, v, "b h q k, c b k h e -> c b q h e")
        attn_out = einsum(z, attn.W_O, "c b q h e, h e d -> c b q d")
        attn_out[-1] += attn.b_O
        out[f"{name}.hook_attn_out"] = attn_out
        x = x + attn_out
        out[f"{name}.hook_resid_mid"] = x

        # MLP. g_c: each component's part of the (gate) pre-activation; b_in is the bias
        # component's in a plain MLP, and absent from the gate of TL's gated MLP.
        mlp = block.mlp
        n = apply_norm(block.ln2, x, cache[f"{name}.ln2.hook_scale"])
        pre = cache[f"{name}.mlp.hook_pre"]  # gated: the gate pre-activation
        post_clean = cache[f"{name}.mlp.hook_post"]
        if model.cfg.gated_mlp:
            g = einsum(n, mlp.W_gate, "c b p d, d n -> c b p n")
            up = cache[f"{name}.mlp.hook_pre_linear"]
            a = mlp.act_fn(pre) * up
            ratio = torch.where(pre != 0, mlp.act_fn(pre) / pre, act_slope_at_zero(mlp.act_fn)) * up
        else:
            g = einsum(n, mlp.W_in, "c b p d, d n -> c b p n")
            g[-1] += mlp.b_in
            a = post_clean
            ratio = torch.where(pre != 0, a / pre, act_slope_at_zero(mlp.act_fn))
        out[f"{name}.mlp.hook_pre"] = g
        if rule == "ratio":
            post = g * ratio
        else:
            post = split_activation(g, a, excluded, rule, temperature)
        post[-1] += post_clean - a  # TL's gated b_in, added after act(gate) * up
        out[f"{name}.mlp.hook_post"] = post
        mlp_out = einsum(post, mlp.W_out, "c b p n, n d -> c b p d")
        mlp_out[-1] += mlp.b_out
        out[f"{name}.hook_mlp_out"] = mlp_out
        x = x + mlp_out
        out[f"{name}.hook_resid_post"] = x

    n = apply_norm(model.ln_final, x, cache["ln_final.hook_scale"])
    logits = einsum(n, model.unembed.W_U, "c b p d, d v -> c b p v")
    logits[-1] += model.unembed.b_U
    out["logits"] = logits
    return out


@torch.no_grad()
def frozen_forward(
    model: HookedTransformer, cache: ActivationCache, entry_resid: Float[Tensor, "batch pos d_model"],
) -> Float[Tensor, "batch pos d_vocab"]:
    """The model from `blocks.0.hook_resid_pre` with the clean run's norm scales and attention
    patterns, and each MLP neuron a linear map with the clean ratio (the ratio rule); every bias
    included. Affine in `entry_resid`: f(0) is the bias path, f(x) - f(0) the linear part."""
    check_supported(model)

    def norm(module, x, scale):
        if isinstance(module, LayerNorm):
            return (x - x.mean(-1, keepdim=True)) / scale * module.w + module.b
        return x / scale * module.w

    x = entry_resid
    for layer, block in enumerate(model.blocks):
        def c(hook, layer=layer):
            return cache[f"blocks.{layer}.{hook}"]
        h = norm(block.ln1, x, c("ln1.hook_scale"))
        v = einsum(h, block.attn.W_V, "b p d, h d e -> b p h e") + block.attn.b_V
        z = einsum(c("attn.hook_pattern"), v, "b h q k, b k h e -> b q h e")
        x = x + einsum(z, block.attn.W_O, "b q h e, h e d -> b q d") + block.attn.b_O
        h = norm(block.ln2, x, c("ln2.hook_scale"))
        mlp, pre_clean = block.mlp, c("mlp.hook_pre")
        slope0 = act_slope_at_zero(mlp.act_fn)
        if model.cfg.gated_mlp:
            gate = einsum(h, mlp.W_gate, "b p d, d n -> b p n")
            gain = torch.where(pre_clean != 0, mlp.act_fn(pre_clean) / pre_clean, slope0)
            post = gate * gain * c("mlp.hook_pre_linear") + mlp.b_in
        else:
            pre = einsum(h, mlp.W_in, "b p d, d n -> b p n") + mlp.b_in
            post = pre * torch.where(pre_clean != 0, c("mlp.hook_post") / pre_clean, slope0)
        x = x + einsum(post, mlp.W_out, "b p n, n d -> b p d") + mlp.b_out
    h = norm(model.ln_final, x, cache["ln_final.hook_scale"])
    return einsum(h, model.unembed.W_U, "b p d, d v -> b p v") + model.unembed.b_U
