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
