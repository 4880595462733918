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

# The sparse masked product is used when its padded rows and gathered factors (tiles · (rows per
# tile + 1) pair-sized blocks) are under this fraction of the dense product's pairs: the gathers
# move memory, which is slower per element than a GEMM's multiply-adds.
_SPARSE_MAX_FRACTION = 0.5
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

    Dense: two GEMMs over all (sample, component) pairs. Sparse (when the mask is mostly zeros,
    as after batch top-k): only the pairs with a non-zero mask, grouped by component into tiles
    of `T = ⌈pairs / C⌉` rows (so at most 2C tiles and about 2·pairs padded rows), each tile
    multiplied by its component's factors in one batched GEMM: a few large operations rather
    than a loop over components, which stalls when threads must wait for busy cores.
    """
    (C, d_in, m), d_out, batch = first.shape, second.shape[-1], a.shape[0]
    c_idx, b_idx = mask.T.nonzero().unbind(1)  # pairs sorted by component
    n_pairs = len(c_idx)
    rows_per_tile = max(1, -(-n_pairs // C))
    counts = torch.bincount(c_idx, minlength=C)
    tiles = (counts + rows_per_tile - 1) // rows_per_tile
    n_tiles = int(tiles.sum())
    if n_pairs == 0 or n_tiles * (rows_per_tile + 1) > _SPARSE_MAX_FRACTION * batch * C:
        inner = _apply_first(a, first) * mask[:, :, None]
        return inner.reshape(batch, C * m) @ second.reshape(C * m, d_out)
    # each pair's slot: its component's first tile, then its rank among that component's pairs
    rank = torch.arange(n_pairs, device=a.device) - (counts.cumsum(0) - counts)[c_idx]
    slot = (tiles.cumsum(0) - tiles)[c_idx] * rows_per_tile + rank
    sample = torch.full((n_tiles * rows_per_tile,), batch, device=a.device)  # `batch`: padding
    sample[slot] = b_idx
    weight = mask.new_zeros(n_tiles * rows_per_tile)
    weight[slot] = mask[b_idx, c_idx]
    tile_component = torch.repeat_interleave(
        torch.arange(C, device=a.device), tiles, output_size=n_tiles
    )
    rows = torch.cat([a, a.new_zeros(1, d_in)]).index_select(0, sample)
    inner = torch.bmm(rows.view(n_tiles, rows_per_tile, d_in), first.index_select(0, tile_component))
    inner = inner * weight.view(n_tiles, rows_per_tile, 1)
    outs = torch.bmm(inner, second.index_select(0, tile_component)).view(-1, d_out)
    return a.new_zeros(batch + 1, d_out).index_add(0, sample, outs)[:batch]
