"""Query/key norms (Qwen3) hold a head axis beside the position axis: a TransformerBridge fires
them as [batch, head, pos, ...], a HookedTransformer flattens them to [batch*pos*head, d_head].
Kept values, padding, chunks and windows must cut and zero them at their positions, and the fast
attention (which never computes Q or K) must step aside when one is kept."""

import pytest
import torch

import tl_depass
from tl_depass.engine.backends import bridge_class, hooked_class

F64 = tl_depass.completeness_rtol(torch.float64)
QK = ("attn.q_norm.", "attn.k_norm.", "attn.hook_q_normed", "attn.hook_k_normed")


def qwen3(backend: str):
    if backend == "hooked":
        if hooked_class() is None:
            pytest.skip("this transformer_lens has no HookedTransformer")
        from matrix import MATRIX
        from tiny import make_model

        model = make_model(**MATRIX["qwen3_qk_norm"])
        tokens = torch.randint(0, model.cfg.d_vocab, (2, 9), generator=torch.Generator().manual_seed(1))
        return model, tokens
    if bridge_class() is None:
        pytest.skip("this transformer_lens has no TransformerBridge")
    from bridges import make_bridge

    tokens = torch.randint(0, 61, (2, 9), generator=torch.Generator().manual_seed(1))
    return make_bridge("Qwen3ForCausalLM")[0], tokens


def by_position(model, value: torch.Tensor) -> torch.Tensor:
    """[component, batch, pos, ...] whatever the backend's layout (the Bridge's is head-major)."""
    return value.transpose(2, 3) if tl_depass.engine.backends.is_bridge(model) else value


def close(a, b, name):
    torch.testing.assert_close(a, b, rtol=0, atol=F64 * b.abs().max().item(), msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("backend", ["hooked", "bridge"])
def test_kept_query_key_norms_with_padding_and_chunks(backend):
    model, tokens = qwen3(backend)
    mask = torch.ones_like(tokens)
    mask[1, 6:] = 0
    keep = lambda name: any(q in name for q in QK) or name.endswith("hook_resid_post")  # noqa: E731
    whole = tl_depass.decompose(model, tokens, keep=keep, attention_mask=mask, logits="all")
    kept = [n for n in whole.results if any(q in n for q in QK)]
    assert len(kept) >= 4, kept  # each layer's normalized query and key at least
    for name in kept:
        value = by_position(model, whole[name])
        assert value.shape[:3] == (tokens.shape[1] + 1, *tokens.shape), f"{name}: {tuple(value.shape)}"
        assert not value[:, 1, 6:].any(), f"{name}: padded positions have shares"
        assert not value[6:-1, 1].any(), f"{name}: padding components have shares"
    for chunk in (3, 4):
        part = tl_depass.decompose(model, tokens, keep=keep, attention_mask=mask, logits="all",
                                   chunk_size=chunk)
        for name, value in whole.results.items():
            close(part[name], value, f"{name}, chunk_size={chunk}")


@pytest.mark.parametrize("backend", ["hooked", "bridge"])
def test_replayed_query_key_norm_scales_run_in_windows(backend, windows):
    """A user's hook on the pattern keeps the attention's own forward, which replays the query/key
    norms' scales: the windows cut them at their position axis."""
    model, tokens = qwen3(backend)
    seen = []
    hooks = [(f"blocks.{layer}.attn.hook_pattern", lambda x, hook: seen.append(hook.name))
             for layer in (0, 1)]
    with model.hooks(fwd_hooks=hooks):
        for rule in ("softmax", "ratio"):
            whole = tl_depass.decompose(model, tokens, mlp_rule=rule, logits="all")
            windows.clear()
            part = tl_depass.decompose(model, tokens, mlp_rule=rule, logits="all", chunk_size=3)
            assert windows == [0, 3, 6], f"{rule}: windows {windows}"
            for name, value in whole.results.items():
                close(part[name], value, f"{rule} {name}")
    assert seen, "the attention's own forward ran"
