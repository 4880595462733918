"""Counting a model's forwards during a call (the backward path's one-forward tests), and which
fast path a call took."""

import tl_depass
from tl_depass.engine import plan, through


def forwards(model, fn):
    """How many times `model` runs its forward during `fn()`, and `fn()`'s result."""
    calls = []
    handle = model.register_forward_hook(lambda module, args, out: calls.append(1))
    try:
        out = fn()
    finally:
        handle.remove()
    return len(calls), out


def mlp_entry_and_full(monkeypatch, *args, **options):
    """`tl_depass.decompose(*args, **options)` with groups entering after their MLP's output
    (`through.after_mlp`, checked to be taken) and with the full replay (`plan.mlp_output_entry`
    off)."""
    taken = []
    real = through.after_mlp

    def spy(ff, *more):
        taken.append(ff.plan.through.layer)
        return real(ff, *more)
    with monkeypatch.context() as m:
        m.setattr(through, "after_mlp", spy)
        quick = tl_depass.decompose(*args, **options)
    assert taken, "the MLP-output entry was not used"
    with monkeypatch.context() as m:
        m.setattr(plan, "mlp_output_entry", lambda *a: None)
        full = tl_depass.decompose(*args, **options)
    return quick, full
