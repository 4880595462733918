"""Where SPD decomposes a TransformerLens model: its *sites*, found from the model's weights.

A *site* is one weight matrix as the model uses it, described by TransformerLens hook names:
`output = input @ W + b`, with `input` the value at `input_hook` (heads flattened) and `output`
the value at `output_hook`. The model's own weights are read, with no weight processing beyond
what the model already had; because `ln*.hook_normalized` is recorded BEFORE the norm's own
weight and bias, a site that reads a norm output folds them in, as `fold_ln` would:
`W = diag(ln.w) W_model`, `b = ln.b W_model + b_model`.

- `W_in`: `blocks.L.ln2.hook_normalized` -> `blocks.L.mlp.hook_pre` (gated MLPs:
  `hook_pre_linear`); W = `diag(w) W_in`, b = `b W_in + b_in` (gated: `b W_in`).
- `W_gate` (gated MLPs only): `blocks.L.ln2.hook_normalized` -> `blocks.L.mlp.hook_pre`;
  W = `diag(w) W_gate`, b = `b W_gate`.
- `W_out`: `blocks.L.mlp.hook_post` -> `blocks.L.hook_mlp_out`; W = `W_out`, b = `b_out`.
- `W_V`: `blocks.L.ln1.hook_normalized` -> `blocks.L.attn.hook_v`; W = `diag(w) W_V` as
  `[d_model, (head d_head)]` (grouped-query attention: the key/value heads), b = `b W_V + b_V`.
- `W_O`: `blocks.L.attn.hook_z` -> `blocks.L.hook_attn_out`; W = `W_O` as
  `[(head d_head), d_model]`, b = `b_O`. Subcomponents of W_V and W_O may span heads.

(TransformerLens' gated MLP computes `act(hook_pre) * hook_pre_linear + b_in`: `hook_pre` is the
gate. Without a norm the input hooks are `hook_resid_mid` and `hook_resid_pre`.)
"""

from dataclasses import dataclass

import einops
import torch
from jaxtyping import Float
from torch import Tensor

from tl_depass.engine.backends import Model
from tl_depass.engine.hooks import attn_out, attn_z, block_hook, mlp_out, resid_pre
from tl_depass.errors import DepassError, UnsupportedModelError

MATRICES = ("W_in", "W_gate", "W_out", "W_V", "W_O")


@dataclass(frozen=True)
class SiteSpec:
    """One weight matrix as the model uses it: `hook(output_hook) = hook(input_hook) @ weight + bias`.
    `in_heads`/`out_heads` > 0: that hook has a `head_index d_head` pair, flattened here."""

    name: str
    layer: int
    matrix: str
    input_hook: str
    output_hook: str
    weight: Float[Tensor, "d_in d_out"]
    bias: Float[Tensor, " d_out"]
    in_heads: int = 0
    out_heads: int = 0


def site_key(name: str) -> str:
    """A site's name as a module key (`blocks.0.mlp.W_in` -> `blocks__0__mlp__W_in`)."""
    return name.replace(".", "__")


def _check_supported(model: Model) -> None:
    cfg = model.cfg
    flags = [f for f in ("use_split_qkv_input", "use_attn_in", "use_normalization_before_and_after")
             if getattr(cfg, f, False)]
    if getattr(cfg, "load_in_4bit", False):
        flags.append("load_in_4bit")
    if flags:
        raise UnsupportedModelError(
            f"parameter-decomposition sites need each matrix to read one hook and write one hook; "
            f"this model sets {flags}, which puts a head axis or a norm between them. Load the "
            "model without these options")


def _norm_affine(model: Model, layer: int, which: str) -> tuple[str, Tensor | None, Tensor | None]:
    """(input hook, norm weight, norm bias) of the norm `which` ('ln1'/'ln2') of a block."""
    if model.cfg.normalization_type is None:
        return (resid_pre(layer) if which == "ln1" else block_hook(layer, "hook_resid_mid")), None, None
    norm = getattr(model.blocks[layer], which)
    return block_hook(layer, f"{which}.hook_normalized"), getattr(norm, "w", None), getattr(norm, "b", None)


def _fold(weight: Tensor, bias: Tensor | None, w: Tensor | None, b: Tensor | None) -> tuple[Tensor, Tensor]:
    """Fold a norm's affine map `x ↦ x w + b` in front of `x ↦ x weight + bias`."""
    out_bias = weight.new_zeros(weight.shape[1]) if bias is None else bias
    if b is not None:
        out_bias = out_bias + b @ weight
    if w is not None:
        weight = w[:, None] * weight
    return weight, out_bias


def _param(model: Model, layer: int, module: str, name: str) -> Tensor | None:
    """A block's own parameter (None where the model has none, e.g. a bias-free Bridge)."""
    return getattr(getattr(model.blocks[layer], module), name, None)


def site_spec(model: Model, layer: int, matrix: str) -> SiteSpec:
    """The site of `matrix` in block `layer`, weights as the model holds them (not copied)."""
    cfg = model.cfg
    gated = bool(getattr(cfg, "gated_mlp", False))
    if matrix in ("W_in", "W_gate", "W_out") and getattr(cfg, "attn_only", False):
        raise DepassError(f"{matrix}: this model is attention-only (no MLP); decompose W_V or W_O")
    if matrix == "W_gate" and not gated:
        raise DepassError("W_gate: this MLP is not gated; its only input matrix is W_in")
    if matrix in ("W_in", "W_gate"):
        hook, w, b = _norm_affine(model, layer, "ln2")
        weight = _param(model, layer, "mlp", matrix)
        bias = None if gated else _param(model, layer, "mlp", "b_in")
        out = block_hook(layer, "mlp.hook_pre" if matrix == "W_gate" or not gated
                         else "mlp.hook_pre_linear")
        weight, bias = _fold(weight, bias, w, b)
        return SiteSpec(block_hook(layer, f"mlp.{matrix}"), layer, matrix, hook, out, weight, bias)
    if matrix == "W_out":
        weight, bias = _fold(_param(model, layer, "mlp", "W_out"), _param(model, layer, "mlp", "b_out"),
                             None, None)
        return SiteSpec(block_hook(layer, "mlp.W_out"), layer, matrix, block_hook(layer, "mlp.hook_post"),
                        mlp_out(layer), weight, bias)
    if matrix == "W_V":
        hook, w, b = _norm_affine(model, layer, "ln1")
        attn = model.blocks[layer].attn
        grouped = getattr(cfg, "n_key_value_heads", None) and not getattr(
            cfg, "ungroup_grouped_query_attention", False)
        if grouped and hasattr(attn, "_W_V"):  # hook_v holds the key/value heads only
            w_v, b_v = attn._W_V, attn._b_V
        else:
            w_v, b_v = attn.W_V, attn.b_V
        weight = einops.rearrange(w_v, "head d_model d_head -> d_model (head d_head)")
        bias = None if b_v is None else einops.rearrange(b_v, "head d_head -> (head d_head)")
        weight, bias = _fold(weight, bias, w, b)
        return SiteSpec(block_hook(layer, "attn.W_V"), layer, matrix, hook,
                        block_hook(layer, "attn.hook_v"), weight, bias, out_heads=w_v.shape[0])
    if matrix == "W_O":
        w_o = model.blocks[layer].attn.W_O
        weight = einops.rearrange(w_o, "head d_head d_model -> (head d_head) d_model")
        weight, bias = _fold(weight, _param(model, layer, "attn", "b_O"), None, None)
        return SiteSpec(block_hook(layer, "attn.W_O"), layer, matrix, attn_z(layer), attn_out(layer),
                        weight, bias, in_heads=w_o.shape[0])
    raise DepassError(f"unknown matrix {matrix!r}: choose from {MATRICES}")


def find_sites(model: Model, matrices: tuple[str, ...] = ("W_in", "W_out"),
               layers: tuple[int, ...] | None = None) -> list[SiteSpec]:
    """The sites of `matrices` in `layers` (None: every layer), layer by layer, weights detached
    copies of what the model computes with (a HookedTransformer or a TransformerBridge)."""
    _check_supported(model)
    n_layers = model.cfg.n_layers
    layers = tuple(range(n_layers)) if layers is None else tuple(layers)
    bad = [layer for layer in layers if not 0 <= layer < n_layers]
    if bad:
        raise DepassError(f"layers {bad} do not exist: this model has layers 0..{n_layers - 1}")
    unknown = [m for m in matrices if m not in MATRICES]
    if unknown:
        raise DepassError(f"unknown matrices {unknown}: choose from {MATRICES}")
    with torch.no_grad():
        specs = [site_spec(model, layer, m) for layer in layers for m in matrices]
    return [SiteSpec(**{**s.__dict__, "weight": s.weight.detach().clone(),
                        "bias": s.bias.detach().clone()}) for s in specs]


def flatten_heads(value: Tensor, heads: int) -> Tensor:
    return einops.rearrange(value, "... head d_head -> ... (head d_head)") if heads else value


def unflatten_heads(value: Tensor, heads: int) -> Tensor:
    return einops.rearrange(value, "... (head d_head) -> ... head d_head", head=heads) if heads else value
