"""Fixtures shared by the whole suite (helpers to import live in tests/tiny.py, tests/bridges.py)."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """The test models are tiny: one thread avoids oversubscribing shared 2-core machines."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model():
    """A tiny float64 HookedTransformer with every parameter randomised (`tiny.make_model()`),
    one per test module; a module that needs another model defines its own `model` fixture.
    Skips where TransformerLens has no HookedTransformer (4.x)."""
    from tiny import make_model  # imported here: tiny skips at import on TransformerLens 4

    return make_model()


@pytest.fixture
def windows(monkeypatch):
    """The windows (engine/sweep.window) of a call's forwards that keep values (also of chunks
    in lockstep, engine/together.py), not the statistics sweep's; each forward's kept values
    cover its window's positions only."""
    from tl_depass.engine import sweep

    seen: list[int] = []

    class Recording(sweep.FoldedForward):
        def kept(self, tokens, attention_mask):
            seen.append(self.window)
            out = super().kept(tokens, attention_mask)
            n = tokens.shape[1] - self.window
            assert all(v.shape[3] == n for name, v in out.items() if name != "unembed.hook_out"), \
                {name: v.shape for name, v in out.items()}
            return out

    run_together = sweep.run_together

    def together(model, tokens, mask, forwards, sink):  # chunks in lockstep: their windows
        seen.extend(f.window for f in forwards)
        return run_together(model, tokens, mask, forwards, sink)

    monkeypatch.setattr(sweep, "FoldedForward", Recording)
    monkeypatch.setattr(sweep, "run_together", together)
    return seen
