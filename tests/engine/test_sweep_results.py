"""One forward's kept tensors become the results (no copy): the probes are moved out in place,
hooks that kept one tensor share one result, and the values equal a chunked run's."""

import pytest
import torch

import tl_depass
from tl_depass.engine import sweep

tiny = pytest.importorskip("tiny")


@pytest.mark.parametrize("groups, k", [(1, 5), (1, 0), (3, 1), (5, 2), (12, 12)])
def test_without_probes_moves_every_row_down_over_the_probes(groups, k):
    value = torch.randn(groups, k + 2, 2, 3, dtype=torch.float64)
    expected = torch.cat([torch.cat([value[g, :k], value[g, k + 1:]]) for g in range(groups)])
    out = sweep.without_probes(value)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert out.data_ptr() == value.data_ptr()  # a view of the forward's tensor


def test_own_results_copies_only_what_overlaps_another_hook():
    base = torch.randn(1, 4, 2, 3, dtype=torch.float64)
    overlap = base.flatten(0, 1)[1:].unflatten(0, (1, 3))  # the same storage, another view
    kept = {"a": base, "b": base, "c": overlap}
    expected = {n: torch.cat([v[0, :-2], v[0, -1:]]) for n, v in kept.items()}
    out = sweep.own_results(kept)
    for name, value in expected.items():
        torch.testing.assert_close(out[name], value, rtol=0, atol=0, msg=name)
    assert out["a"] is out["b"]
    assert out["c"].untyped_storage().data_ptr() != base.untyped_storage().data_ptr()


@pytest.fixture
def kept_storages(monkeypatch):
    """The storages of the tensors each forward keeps."""
    seen: set[int] = set()

    class Recording(sweep.FoldedForward):
        def kept(self, tokens, attention_mask):
            out = super().kept(tokens, attention_mask)
            seen.update(v.untyped_storage().data_ptr() for v in out.values())
            return out

    monkeypatch.setattr(sweep, "FoldedForward", Recording)
    return seen


@pytest.mark.parametrize("components", ["tokens", "neurons"])
def test_one_forward_returns_its_own_tensors(components, kept_storages):
    model = tiny.make_model()
    tokens = tiny.random_tokens(model, batch=2, pos=7)
    spec = tl_depass.Neurons(1) if components == "neurons" else "tokens"
    whole = tl_depass.decompose(model, tokens, spec, logits="all", max_memory=2**62)
    entered = [n for n in whole.results if n != "logits" and whole[n][1:].any()]
    assert entered and all(whole[n].untyped_storage().data_ptr() in kept_storages for n in entered)
    kept_storages.clear()
    part = tl_depass.decompose(model, tokens, spec, logits="all", chunk_size=3)
    assert not any(part[n].untyped_storage().data_ptr() in kept_storages for n in part.results)
    for name in whole.results:
        atol = tl_depass.completeness_rtol(torch.float64) * max(whole[name].abs().max().item(), 1.0)
        torch.testing.assert_close(part[name], whole[name], rtol=0, atol=atol,
                                   msg=lambda m, n=name: f"{components} {n}: {m}")


def test_hooks_that_kept_one_tensor_share_the_result():
    """blocks.0.hook_resid_post is the tensor blocks.1.hook_resid_pre receives: one result, with
    one forward and with chunks (each hook still reads its own, equal, values)."""
    model = tiny.make_model()
    tokens = tiny.random_tokens(model, batch=1, pos=6)
    for chunk_size in (None, 2):
        dec = tl_depass.decompose(model, tokens, chunk_size=chunk_size, max_memory=2**62)
        post, pre = dec["blocks.0.hook_resid_post"], dec["blocks.1.hook_resid_pre"]
        assert post.untyped_storage().data_ptr() == pre.untyped_storage().data_ptr(), chunk_size
        torch.testing.assert_close(post.sum(0), dec.clean["blocks.0.hook_resid_post"])


def test_one_forward_starts_at_the_entry_block(monkeypatch):
    """One forward of a group entering at block 1 (one layer's heads) still starts there."""
    from tl_depass.levels import Heads

    starts = []
    real = sweep.FoldedForward.__init__

    def spy(self, model, clean, plan, *args, **kwargs):
        starts.append(plan.start_layer)
        real(self, model, clean, plan, *args, **kwargs)
    monkeypatch.setattr(sweep.FoldedForward, "__init__", spy)
    model = tiny.make_model()
    tl_depass.decompose(model, tiny.random_tokens(model, 1, 5), Heads(layers=[1]))
    assert starts == [1]
