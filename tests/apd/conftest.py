"""Shared fixtures: float64 everywhere, one torch thread, and a hand-set linear toy target."""

from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

from tl_depass.apd.targets import Site, ToyTarget, sparse_features


@pytest.fixture(autouse=True)
def float64():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    yield
    torch.set_default_dtype(previous)


class LinearTarget(ToyTarget):
    """f(x) = x @ W: a one-matrix target whose derivatives are known in closed form."""

    def __init__(self, weight: Tensor):
        super().__init__()
        self.n_features = weight.shape[0]
        self.W = nn.Parameter(weight.clone())
        self.sites = (Site("W", "W", "as_is"),)

    def _forward(self, x: Tensor, apply: Callable[[str, Tensor], Tensor], hidden: dict) -> Tensor:
        return apply("W", x)

    def sample(self, batch: int, generator: torch.Generator) -> Tensor:
        return sparse_features(batch, self.n_features, 0.5, -1.0, 1.0, generator)

    def labels(self, x: Tensor) -> Tensor:
        return x


@pytest.fixture
def linear_target() -> LinearTarget:
    return LinearTarget(torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, -1.0]]))
