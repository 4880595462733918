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


#: Hugging Face families whose own forward computes some operations in float32 even in a float64
#: model, and what (measured with transformers 5.24). A float64 clean run of these agrees with the
#: model's unhooked forward only to float32 precision; tests/bridges.py `float64_reference`
#: recomputes exactly these operations in float64 and agrees with the clean run to float64.
UPSTREAM_FLOAT32: dict[str, str] = {
    **dict.fromkeys(("GPTJForCausalLM", "OPTForCausalLM"), (
        "eager attention computes Q.K in float32; the default sdpa path does not, and DePass's clean "
        "run takes the eager one (backends.forward_as_recorded) so that hook_pattern fires")),
    **dict.fromkeys(("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "Gemma2ForCausalLM"), (
        "RMSNorm normalises in float32; DePass replays norm scales through TransformerLens's norm "
        "path, which computes in the model's dtype")),
    "OlmoForCausalLM": ("OLMo's weightless LayerNorm normalises in float32; DePass replays norm scales "
                        "through TransformerLens's norm path, which computes in the model's dtype"),
}


def upstream_rtol(architecture: str, dtype: torch.dtype) -> float:
    """How closely a clean run in `dtype` can agree with the upstream model's own forward."""
    if architecture in UPSTREAM_FLOAT32:
        return max(completeness_rtol(dtype), completeness_rtol(torch.float32))
    return completeness_rtol(dtype)
