"""One tolerance table, shared by the library (`completeness_error`, input checks) and the tests."""

import torch

#: Largest allowed relative error, max|sum of components - clean| / max|clean|, per dtype.
COMPLETENESS_RTOL: dict[torch.dtype, float] = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.bfloat16: 3e-2,
    torch.float16: 5e-3,
}


def completeness_rtol(dtype: torch.dtype) -> float:
    """The completeness tolerance for results computed in `dtype`."""
    if dtype not in COMPLETENESS_RTOL:
        raise KeyError(f"no completeness tolerance for {dtype}; known: {list(COMPLETENESS_RTOL)}")
    return COMPLETENESS_RTOL[dtype]


def relative_error(total: torch.Tensor, clean: torch.Tensor) -> float:
    """max|total - clean| / max|clean| (0 when both are zero)."""
    scale = clean.abs().max().item()
    err = (total - clean).abs().max().item()
    return err / scale if scale > 0 else err
