"""APD's per-component products as plain GEMMs, in the cheapest order for the factor shapes.

A site's components act on an input `a` through factors `first: [C, d_in, m]` and
`second: [C, m, d_out]` (`P_c = first_c @ second_c`). These functions never build per-sample
weights, and build `[batch, C, d_out]` only where no cheaper order exists. Each chooses between
mathematically equal orders by counting multiply-adds; the results agree to float rounding.
"""

import torch
from jaxtyping import Float
from torch import Tensor

__all__ = ["component_outputs", "masked_product", "output_grad_contraction"]

# Python and autograd overhead of one component's two small GEMMs in the sparse masked product
# (forward and backward), in multiply-adds at a CPU's matmul rate (~50 µs at ~40 GMAC/s).
_PER_COMPONENT_OVERHEAD_MACS = 2e6
# Largest [batch chunk, C, d_out] block of component outputs built at once (elements).
_CHUNK_ELEMENTS = 2**25


def _apply_first(
    a: Float[Tensor, "batch d_in"], first: Float[Tensor, "C d_in m"]
) -> Float[Tensor, "batch C m"]:
    """`a @ first_c` for every c as one GEMM."""
    C, d_in, m = first.shape
    return (a @ first.permute(1, 0, 2).reshape(d_in, C * m)).view(a.shape[0], C, m)


def component_outputs(
    a: Float[Tensor, "batch d_in"],
    first: Float[Tensor, "C d_in m"],
    second: Float[Tensor, "C m d_out"],
) -> Float[Tensor, "batch C d_out"]:
    """`a @ first_c @ second_c` for every component: through the rank-m inner product, or
    through `P_c = first_c @ second_c` when that costs fewer multiply-adds."""
    (C, d_in, m), d_out, batch = first.shape, second.shape[-1], a.shape[0]
    if C * d_in * m * d_out + batch * C * d_in * d_out < batch * C * m * (d_in + d_out):
        weights = torch.bmm(first, second)  # [C, d_in, d_out]
        return (a @ weights.permute(1, 0, 2).reshape(d_in, C * d_out)).view(batch, C, d_out)
    inner = _apply_first(a, first).transpose(0, 1)  # [C, batch, m]
    return torch.bmm(inner, second).transpose(0, 1)


def output_grad_contraction(
    a: Float[Tensor, "batch d_in"],
    first: Float[Tensor, "C d_in m"],
    second: Float[Tensor, "C m d_out"],
    grad: Float[Tensor, "batch n_out d_out"],
    out: Float[Tensor, "batch C n_out"] | None = None,
) -> Float[Tensor, "batch C n_out"]:
    """`Σ_j grad[b, o, j] · (a_b @ first_c @ second_c)_j`: each component's output at the site,
    pushed through the output Jacobian `grad = ∂f_o/∂(site output)`; added into `out` in place
    when given (to sum sites without another pass over `[batch, C, n_out]`).

    A `grad` with stride 0 over the batch (the expanded result of a batch-independent Jacobian)
    is used once: `(a @ first_c) @ (second_c @ g_0ᵀ)` or `a @ (first_c @ second_c @ g_0ᵀ)`,
    whichever is cheaper, and no `[batch, C, d_out]` tensor is built. Otherwise the component
    outputs are built in batch chunks and contracted per sample.
    """
    (C, d_in, m), d_out, batch, n_out = first.shape, second.shape[-1], a.shape[0], grad.shape[1]
    if out is None:
        out = a.new_empty(batch, C, n_out)
        beta = 0.0  # overwrite the uninitialised memory
    else:
        beta = 1.0
    if batch == 1 or grad.stride(0) == 0:
        g = grad[0]  # [n_out, d_out]
        second_g = second @ g.T  # [C, m, n_out]
        via_inner = batch * C * d_in * m + batch * C * m * n_out
        via_weights = C * d_in * m * n_out + batch * C * d_in * n_out
        if via_weights < via_inner:
            q = torch.bmm(first, second_g).permute(1, 0, 2).reshape(d_in, C * n_out)
            out.view(batch, C * n_out).addmm_(a, q, beta=beta)
        else:
            inner = _apply_first(a, first).transpose(0, 1)  # [C, batch, m]
            result = torch.bmm(inner, second_g).transpose(0, 1)
            if beta:
                out.add_(result)
            else:
                out.copy_(result)
        return out
    chunk = max(1, _CHUNK_ELEMENTS // (C * d_out))
    for a_part, g_part, out_part in zip(
        a.split(chunk), grad.split(chunk), out.split(chunk), strict=True
    ):
        outs = component_outputs(a_part, first, second)  # [chunk, C, d_out]
        out_part.baddbmm_(outs, g_part.transpose(1, 2), beta=beta)
    return out


def masked_product(
    a: Float[Tensor, "batch d_in"],
    first: Float[Tensor, "C d_in m"],
    second: Float[Tensor, "C m d_out"],
    mask: Float[Tensor, "batch C"],
) -> Float[Tensor, "batch d_out"]:
    """`Σ_c mask[b, c] · (a_b @ first_c) @ second_c`, differentiable in every argument.

    Dense: two GEMMs over all (sample, component) pairs. Sparse (when the mask's zeros save
    more than the per-component loop costs, as after batch top-k): each component multiplies
    only the samples where its mask is non-zero.
    """
    (C, d_in, m), d_out, batch = first.shape, second.shape[-1], a.shape[0]
    per_pair = d_in * m + m * d_out
    pairs = mask.T.nonzero()  # [n_pairs, 2] as (c, b), sorted by c
    sparse_cost = len(pairs) * per_pair + C * _PER_COMPONENT_OVERHEAD_MACS
    if len(pairs) == 0 or sparse_cost >= batch * C * per_pair:
        inner = _apply_first(a, first) * mask[:, :, None]
        return inner.reshape(batch, C * m) @ second.reshape(C * m, d_out)
    c_idx, b_idx = pairs.unbind(1)
    counts = torch.bincount(c_idx, minlength=C).tolist()
    active = [c for c in range(C) if counts[c]]
    firsts, seconds = first.unbind(0), second.unbind(0)
    rows = a.index_select(0, b_idx).split(counts)
    inner = torch.cat([rows[c] @ firsts[c] for c in active]) * mask[b_idx, c_idx][:, None]
    inner_rows = inner.split([counts[c] for c in active])
    outs = torch.cat([part @ seconds[c] for part, c in zip(inner_rows, active, strict=True)])
    return a.new_zeros(batch, d_out).index_add(0, b_idx, outs)
