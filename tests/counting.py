"""Counting a model's forwards during a call (the backward path's one-forward tests)."""


def forwards(model, fn):
    """How many times `model` runs its forward during `fn()`, and `fn()`'s result."""
    calls = []
    handle = model.register_forward_hook(lambda module, args, out: calls.append(1))
    try:
        out = fn()
    finally:
        handle.remove()
    return len(calls), out
