"""One call at a time per model.

TransformerLens hooks belong to a model's HookPoints, not to a thread: two calls on one model at
once would run each other's hooks. Every public function that hooks the model holds the model's
lock for the whole call (re-entrant: `attribute` calls `decompose`). Locks are kept in a weak
table keyed by the model, so the model is neither changed nor kept alive.
"""

import functools
import threading
import weakref
from collections.abc import Callable
from typing import TypeVar

import torch

F = TypeVar("F", bound=Callable)

_locks: "weakref.WeakKeyDictionary[torch.nn.Module, threading.RLock]" = weakref.WeakKeyDictionary()
_table = threading.Lock()  # guards _locks itself


def model_lock(model: torch.nn.Module) -> threading.RLock:
    """The re-entrant lock that serialises tl_depass calls on `model`."""
    with _table:
        lock = _locks.get(model)
        if lock is None:
            lock = _locks[model] = threading.RLock()
        return lock


def serialised(fn: F) -> F:
    """`fn(model, ...)` holds `model`'s lock for the whole call. A first argument that is not a
    torch module goes straight through (the function's own check says what is wrong)."""
    @functools.wraps(fn)
    def call(model, *args, **kwargs):
        if not isinstance(model, torch.nn.Module):
            return fn(model, *args, **kwargs)
        with model_lock(model):
            return fn(model, *args, **kwargs)
    return call  # type: ignore[return-value]

