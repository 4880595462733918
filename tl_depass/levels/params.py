"""Parameter components as DePass components: at a decomposed weight matrix, the matrix's output
is split into its subcomponents' outputs `U_c (V_cᵀ x)`, the delta part and the bias, and these
propagate through the rest of the network with the frozen rules.

`decomposition` is an iterable of sites (or has `.sites`): each site has `matrix` (or `name`:
"W_in", "W_out", ...), `layer`, `input_hook`, `output_hook`, `bias` (None or a tensor
broadcastable to the output), `outputs(x) -> [C + 1, ..., d_out]` (the C subcomponents' outputs,
then the delta part) and `causal_importance(x) -> [..., C]`, with x the clean activation at
`input_hook` (passed through `site.read` where a site has one, e.g. to flatten heads). The SPD of a
TransformerLens model (`tl_depass.apd.lm.transformer.ParamDecomposition`) is one.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import einops
import torch
from jaxtyping import Int
from torch import Tensor

from tl_depass.engine.backends import Model
from tl_depass.engine.clean_run import CleanRun
from tl_depass.errors import DepassError
from tl_depass.levels.base import Entry, Group, around, rest_entry
from tl_depass.levels.label import Label
from tl_depass.tolerances import completeness_rtol, relative_error


def matrix(site) -> str:
    return getattr(site, "matrix", None) or site.name


@dataclass(frozen=True, eq=False)
class ParamComponents:
    """One group per decomposed matrix (a `layer` and a site name): its subcomponents, each
    carrying its output where its causal importance is >= `threshold` (elsewhere that output is
    pooled into "inactive"), "inactive", "delta", with the layer's "rest" and "bias"."""

    decomposition: object
    layer: int | Sequence[int] | None = None
    sites: Sequence[str] | None = None
    threshold: float = 0.1

    def chosen(self) -> list:
        layers = [self.layer] if isinstance(self.layer, int) else self.layer
        all_sites = getattr(self.decomposition, "sites", self.decomposition)
        all_sites = list(all_sites.values() if hasattr(all_sites, "values") else all_sites)
        out = [s for s in all_sites if (layers is None or s.layer in layers)
               and (self.sites is None or matrix(s) in self.sites)]
        if not out:
            have = sorted({(s.layer, matrix(s)) for s in all_sites})
            raise DepassError(f"ParamComponents: no decomposed matrix at layer={self.layer}, "
                              f"sites={self.sites}; the decomposition has (layer, site) {have}")
        return out

    def check(self, model: Model) -> "ParamComponents":
        self.chosen()
        return self

    def reads(self, model: Model) -> list[str]:
        return [h for s in self.chosen() for h in (s.input_hook, s.output_hook)]

    def groups(self, model: Model, clean: CleanRun, tokens: Int[Tensor, "batch pos"]) -> list[Group]:
        out = [self.group(site, clean) for site in self.chosen()]
        if len({len(g.labels) for g in out}) > 1:  # groups ride in one folded forward
            raise DepassError("ParamComponents: these matrices have different numbers of "
                              "subcomponents; decompose them in separate calls (sites=..., layer=...)")
        return out

    def group(self, site, clean: CleanRun) -> Group:
        x, target = clean[site.input_hook], clean[site.output_hook]
        x = site.read(x) if hasattr(site, "read") else x
        with torch.no_grad():
            outputs = site.outputs(x).to(target.dtype)  # [C + 1, batch, pos, d_out]
            active = site.causal_importance(x) >= self.threshold  # [batch, pos, C]
        bias = torch.zeros_like(target) if site.bias is None else (
            site.bias.to(target.dtype).reshape(-1).expand(*target.shape[:2], -1).reshape(target.shape))
        outputs = outputs.reshape(outputs.shape[0], *target.shape)
        err = relative_error(outputs.sum(0) + bias, target)
        if not err <= completeness_rtol(target.dtype):  # NaN compares False
            raise DepassError(
                f"ParamComponents: the outputs of {matrix(site)} at layer {site.layer} plus its bias do "
                f"not reproduce {site.output_hook} (relative error {err:.1e}): was the parameter "
                "decomposition made for this model, with the same weight processing?")
        mask = einops.rearrange(active, "b p c -> c b p")
        on = outputs[:-1] * mask.reshape(*mask.shape, *[1] * (target.ndim - 2))
        rows = torch.cat([torch.zeros_like(target)[None], on,
                          (outputs[:-1] - on).sum(0, keepdim=True), outputs[-1:]])
        layer, prefix = site.layer, f"L{site.layer}.{matrix(site)}"
        labels = around(layer, [Label(f"{prefix} c{c}", "param", layer, c) for c in range(on.shape[0])]
                        + [Label(f"{prefix} inactive", "inactive", layer),
                           Label(f"{prefix} delta", "delta", layer)])
        return Group(labels, [rest_entry(clean, layer),
                              Entry(site.output_hook, lambda offset, k: rows[offset:offset + k], bias)])
