"""Stochastic Parameter Decomposition of TransformerLens models: sites and the result object.

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

`ParamDecomposition` holds, per site, `C` rank-one subcomponents `W ≈ Σ_c V[:, c] U[c]`, the
delta `W − V U` (one more part, so that every mask of ones gives the target exactly) and the
causal-importance MLPs. `C` counts subcomponents as in the SPD paper; it is not DePass'
`component` axis.
"""

import json
from dataclasses import dataclass
from pathlib import Path

import einops
import torch
import torch.nn.functional as F
from jaxtyping import Float
from safetensors.torch import save_file
from torch import Tensor, nn

from tl_depass.apd.spd import lower_leaky_hard_sigmoid
from tl_depass.engine.files import check_tensors, read_json, read_safetensors, require_keys
from tl_depass.errors import DepassError, UnsupportedModelError

__all__ = ["MATRICES", "SiteSpec", "find_sites", "ParamSite", "ParamDecomposition"]

MATRICES = ("W_in", "W_gate", "W_out", "W_V", "W_O")
FORMAT = "tl_depass.param_decomposition/1"


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


def _check_supported(model) -> None:
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


def _norm_affine(model, layer: int, which: str) -> tuple[str, Tensor | None, Tensor | None]:
    """(input hook, norm weight, norm bias) of the norm `which` ('ln1'/'ln2') of a block."""
    if model.cfg.normalization_type is None:
        return f"blocks.{layer}.hook_resid_{'pre' if which == 'ln1' else 'mid'}", None, None
    norm = getattr(model.blocks[layer], which)
    return f"blocks.{layer}.{which}.hook_normalized", getattr(norm, "w", None), getattr(norm, "b", None)


def _fold(weight: Tensor, bias: Tensor | None, w: Tensor | None, b: Tensor | None) -> tuple[Tensor, Tensor]:
    """Fold a norm's affine map `x ↦ x w + b` in front of `x ↦ x weight + bias`."""
    out_bias = weight.new_zeros(weight.shape[1]) if bias is None else bias
    if b is not None:
        out_bias = out_bias + b @ weight
    if w is not None:
        weight = w[:, None] * weight
    return weight, out_bias


def _param(model, layer: int, module: str, name: str) -> Tensor | None:
    """A block's own parameter (None where the model has none, e.g. a bias-free Bridge)."""
    return getattr(getattr(model.blocks[layer], module), name, None)


def _site(model, layer: int, matrix: str) -> SiteSpec:
    cfg = model.cfg
    block = f"blocks.{layer}"
    gated = bool(getattr(cfg, "gated_mlp", False))
    if matrix in ("W_in", "W_gate", "W_out") and getattr(cfg, "attn_only", False):
        raise DepassError(f"{matrix}: this model is attention-only (no MLP); decompose W_V or W_O")
    if matrix == "W_gate" and not gated:
        raise DepassError("W_gate: this MLP is not gated; its only input matrix is W_in")
    if matrix in ("W_in", "W_gate"):
        hook, w, b = _norm_affine(model, layer, "ln2")
        weight = _param(model, layer, "mlp", matrix)
        bias = None if gated else _param(model, layer, "mlp", "b_in")
        out = f"{block}.mlp.hook_pre" if matrix == "W_gate" or not gated else f"{block}.mlp.hook_pre_linear"
        weight, bias = _fold(weight, bias, w, b)
        return SiteSpec(f"{block}.mlp.{matrix}", layer, matrix, hook, out, weight, bias)
    if matrix == "W_out":
        weight, bias = _fold(_param(model, layer, "mlp", "W_out"), _param(model, layer, "mlp", "b_out"),
                             None, None)
        return SiteSpec(f"{block}.mlp.W_out", layer, matrix, f"{block}.mlp.hook_post",
                        f"{block}.hook_mlp_out", weight, bias)
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
        return SiteSpec(f"{block}.attn.W_V", layer, matrix, hook, f"{block}.attn.hook_v", weight,
                        bias, out_heads=w_v.shape[0])
    if matrix == "W_O":
        w_o = model.blocks[layer].attn.W_O
        weight = einops.rearrange(w_o, "head d_head d_model -> (head d_head) d_model")
        weight, bias = _fold(weight, _param(model, layer, "attn", "b_O"), None, None)
        return SiteSpec(f"{block}.attn.W_O", layer, matrix, f"{block}.attn.hook_z",
                        f"{block}.hook_attn_out", weight, bias, in_heads=w_o.shape[0])
    raise DepassError(f"unknown matrix {matrix!r}: choose from {MATRICES}")


def find_sites(model, matrices: tuple[str, ...] = ("W_in", "W_out"),
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
        specs = [_site(model, layer, m) for layer in layers for m in matrices]
    return [SiteSpec(**{**s.__dict__, "weight": s.weight.detach().clone(),
                        "bias": s.bias.detach().clone()}) for s in specs]


def flatten_heads(value: Tensor, heads: int) -> Tensor:
    return einops.rearrange(value, "... head d_head -> ... (head d_head)") if heads else value


def unflatten_heads(value: Tensor, heads: int) -> Tensor:
    return einops.rearrange(value, "... (head d_head) -> ... head d_head", head=heads) if heads else value


class ParamSite(nn.Module):
    """The decomposition of one site: `W = V U + delta`, a causal-importance MLP per subcomponent
    (1 → `ci_hidden` GELU → 1 on `V_c · x`), and the site's frozen weight and bias."""

    def __init__(self, spec: SiteSpec, C: int, ci_hidden: int, generator: torch.Generator):
        super().__init__()
        self.name, self.layer, self.matrix = spec.name, spec.layer, spec.matrix
        self.input_hook, self.output_hook = spec.input_hook, spec.output_hook
        self.in_heads, self.out_heads = spec.in_heads, spec.out_heads
        self.register_buffer("weight", spec.weight)
        self.register_buffer("bias", spec.bias)
        d_in, d_out = spec.weight.shape
        dtype = spec.weight.dtype
        v = torch.randn(d_in, C, generator=generator, dtype=dtype)
        u = torch.randn(C, d_out, generator=generator, dtype=dtype)
        v, u = v / v.norm(dim=0, keepdim=True), u / u.norm(dim=1, keepdim=True)
        overlap = torch.einsum("ic,io,co->c", v, spec.weight, u)  # SPD paper init
        self.V = nn.Parameter(v)
        self.U = nn.Parameter(u * overlap[:, None])
        self.ci_w1 = nn.Parameter(torch.randn(C, ci_hidden, generator=generator, dtype=dtype) * 2**0.5)
        self.ci_b1 = nn.Parameter(torch.zeros(C, ci_hidden, dtype=dtype))
        self.ci_w2 = nn.Parameter(torch.randn(C, ci_hidden, generator=generator, dtype=dtype)
                                  * ci_hidden**-0.5)
        self.ci_b2 = nn.Parameter(torch.zeros(C, dtype=dtype))

    @property
    def C(self) -> int:
        return self.V.shape[1]

    @property
    def delta(self) -> Float[Tensor, "d_in d_out"]:
        return self.weight - self.V @ self.U

    def describe(self) -> dict:
        return {"name": self.name, "layer": self.layer, "matrix": self.matrix,
                "input_hook": self.input_hook, "output_hook": self.output_hook,
                "in_heads": self.in_heads, "out_heads": self.out_heads, "C": self.C,
                "d_in": self.weight.shape[0], "d_out": self.weight.shape[1],
                "ci_hidden": self.ci_w1.shape[1]}

    def read(self, hook_value: Tensor) -> Float[Tensor, "... d_in"]:
        """The site's input from the value at `input_hook`."""
        return flatten_heads(hook_value, self.in_heads)

    def ci_pre(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... C"]:
        """γ_c(V_c · x) before the sigmoids."""
        hidden = F.gelu((x @ self.V)[..., None] * self.ci_w1 + self.ci_b1)
        return (hidden * self.ci_w2).sum(-1) + self.ci_b2

    def causal_importance(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... C"]:
        """g_c(x) = σ_lower(γ_c(V_c · x)), in [-0.01·|γ|, 1]."""
        return lower_leaky_hard_sigmoid(self.ci_pre(x))

    def outputs(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "C_plus_delta ... d_out"]:
        """Each subcomponent's output `U_c (V_c · x)`, then the delta part `x delta`; with
        `bias` they sum to `x W + b`, the value at `output_hook` (heads flattened)."""
        parts = einops.einsum(x @ self.V, self.U, "... C, C d_out -> C ... d_out")
        return torch.cat([parts, (x @ self.delta)[None]])

    def masked(self, x: Float[Tensor, "... d_in"], clean: Float[Tensor, "... d_out"],
               mask: Float[Tensor, "... C"], delta_mask: Float[Tensor, "..."]) -> Float[Tensor, "... d_out"]:
        """`((x V) ⊙ mask) U + delta_mask · x delta + b`, written as `clean` (= x W + b, the value
        the model computed) minus the masked-out parts, so that all-ones masks return `clean`
        bit for bit."""
        off = ((x @ self.V) * (1 - mask)) @ self.U
        return clean - off - (1 - delta_mask)[..., None] * (x @ self.delta)


class ParamDecomposition(nn.Module):
    """SPD of a TransformerLens model's matrices: one `ParamSite` per site, by name
    (`dec["blocks.0.mlp.W_in"]`), in layer order; `meta` holds the config and measured numbers."""

    def __init__(self, specs: list[SiteSpec], C: int, ci_hidden: int = 16, seed: int = 0,
                 meta: dict | None = None):
        super().__init__()
        if not specs:
            raise DepassError("ParamDecomposition needs at least one site (see find_sites)")
        generator = torch.Generator().manual_seed(seed)
        self.sites = nn.ModuleDict({_key(s.name): ParamSite(s, C, ci_hidden, generator) for s in specs})
        self.meta = dict(meta or {})

    @classmethod
    def from_model(cls, model, matrices: tuple[str, ...] = ("W_in", "W_out"),
                   layers: tuple[int, ...] | None = None, *, C: int, ci_hidden: int = 16,
                   seed: int = 0) -> "ParamDecomposition":
        return cls(find_sites(model, matrices, layers), C, ci_hidden, seed)

    @property
    def names(self) -> list[str]:
        return [site.name for site in self.sites.values()]

    def __getitem__(self, name: str) -> ParamSite:
        if _key(name) not in self.sites:
            raise DepassError(f"no decomposed site {name!r}; this decomposition has {self.names}")
        return self.sites[_key(name)]

    def __iter__(self):
        return iter(self.sites.values())

    def __len__(self) -> int:
        return len(self.sites)

    def causal_importance(self, site: str, x_in: Float[Tensor, "... d_in"]) -> Float[Tensor, "... C"]:
        return self[site].causal_importance(x_in)

    def outputs(self, site: str, x_in: Float[Tensor, "... d_in"]) -> Float[Tensor, "C_plus_delta ... d_out"]:
        return self[site].outputs(x_in)

    def save(self, path: str | Path) -> None:
        """`<path>.safetensors` (every tensor) and `<path>.json` (sites, config, numbers)."""
        base = Path(path).with_suffix("")
        save_file({k: v.detach().contiguous() for k, v in self.state_dict().items()},
                  str(base.with_suffix(".safetensors")))
        record = {"format": FORMAT, "sites": [s.describe() for s in self], "meta": self.meta}
        base.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "ParamDecomposition":
        """A decomposition written by `save`; a damaged or mismatched pair raises a DepassError
        naming the file (nothing in either file can run code: JSON and safetensors)."""
        base = Path(path).with_suffix("")
        pair = base.with_suffix(".json"), base.with_suffix(".safetensors")
        missing = [str(p) for p in pair if not p.exists()]
        if missing:
            raise DepassError(f"a saved ParamDecomposition is a .json and a .safetensors side by "
                              f"side; missing {missing}")
        record = read_json(pair[0], "saved ParamDecomposition")
        if record.get("format") != FORMAT:
            raise DepassError(f"{pair[0]} is not a saved ParamDecomposition (format "
                              f"{record.get('format')!r}, expected {FORMAT!r})")
        sites, C, ci_hidden = _checked_sites(record, pair[0])
        state = read_safetensors(pair[1], "saved ParamDecomposition")
        fixed = {f"sites.{_key(s['name'])}.{n}": shape for s in sites
                 for n, shape in (("weight", (s["d_in"], s["d_out"])), ("bias", (s["d_out"],)))}
        check_tensors(fixed, {k: v for k, v in state.items() if k in fixed}, pair[1],
                      f"the sites in {pair[0].name}")
        specs = [SiteSpec(s["name"], s["layer"], s["matrix"], s["input_hook"], s["output_hook"],
                          state[f"sites.{_key(s['name'])}.weight"],
                          state[f"sites.{_key(s['name'])}.bias"], s["in_heads"], s["out_heads"])
                 for s in sites]
        dec = cls(specs, C, ci_hidden, meta=record["meta"])
        check_tensors({k: tuple(v.shape) for k, v in dec.state_dict().items()}, state, pair[1],
                      f"the sites in {pair[0].name}")
        dec.load_state_dict(state)
        return dec

    def weight_mismatch(self, model) -> dict[str, float]:
        """max|W_site − W_model| / max|W_model| per site: is this the model it was trained on?"""
        out = {}
        for site in self:
            spec = _site(model, site.layer, site.matrix)
            scale = spec.weight.abs().max().clamp_min(1e-30)
            out[site.name] = ((site.weight - spec.weight.to(site.weight)).abs().max() / scale).item()
        return out


def _key(name: str) -> str:
    return name.replace(".", "__")


SITE_FIELDS = {"name": str, "layer": int, "matrix": str, "input_hook": str, "output_hook": str,
               "in_heads": int, "out_heads": int, "C": int, "d_in": int, "d_out": int,
               "ci_hidden": int}


def _checked_sites(record: dict, path: Path) -> tuple[list[dict], int, int]:
    """(sites, C, ci_hidden) of a saved decomposition's JSON, every field checked."""
    require_keys(record, ("sites", "meta"), path, "saved ParamDecomposition")
    sites = record["sites"]
    if not (isinstance(sites, list) and sites and isinstance(record["meta"], dict)):
        raise DepassError(f"{path}: 'sites' must be a non-empty list and 'meta' an object; the "
                          "file is damaged: save the decomposition again")
    for i, site in enumerate(sites):
        bad = [k for k, kind in SITE_FIELDS.items() if not isinstance(site, dict)
               or not isinstance(site.get(k), kind) or isinstance(site.get(k), bool)
               or (kind is int and site[k] < 0)]
        if bad or site["matrix"] not in MATRICES:
            raise DepassError(f"{path}: site {i} has missing or invalid {bad or ['matrix']} (each "
                              f"site needs {list(SITE_FIELDS)}, matrix one of {MATRICES}); the file "
                              "is damaged: save the decomposition again")
    sizes = {(s["C"], s["ci_hidden"]) for s in sites}
    if len(sizes) != 1 or 0 in sizes.pop():
        raise DepassError(f"{path}: every site must have the same positive C and ci_hidden, got "
                          f"{sorted({(s['C'], s['ci_hidden']) for s in sites})}")
    return sites, sites[0]["C"], sites[0]["ci_hidden"]
