"""One call at a time per model, and the user's own hooks either honoured or refused.

TransformerLens hooks belong to a model's HookPoints, not to a thread: two calls on one model at
once would run each other's hooks. Every public function that hooks the model holds the model's
lock for the whole call (re-entrant: `attribute` calls `decompose`). Locks are kept in a weak
table keyed by the model, so the model is neither changed nor kept alive.

A hook of the user's at a point where DePass sets the value itself would be silently skipped in
the decomposed pass while the clean run keeps it; everywhere else the clean run records the
model as the user's hooks make it and the decomposed pass runs those hooks on every component.
See docs/threads_and_hooks.md.
"""

import functools
import threading
import weakref
from collections.abc import Callable, Iterable
from typing import TypeVar

import torch

from tl_depass.engine.backends import Model, canonical_names
from tl_depass.errors import DepassError
from tl_depass.tolerances import completeness_rtol

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
    def call(model: object, *args, **kwargs):
        if not isinstance(model, torch.nn.Module):
            return fn(model, *args, **kwargs)
        with model_lock(model):
            return fn(model, *args, **kwargs)
    return call  # type: ignore[return-value]


def bridge_wiring(hook: Callable) -> bool:
    """Whether `hook` is a TransformerBridge's own: some adapters (OPT, TL 4) forward one hook
    point to another with permanent hooks whose function lives in transformer_lens.model_bridge
    (wrapped, like every hook added with `add_hook`, in TransformerLens's `full_hook`)."""
    for cell in getattr(hook, "__closure__", None) or ():
        try:
            inner = cell.cell_contents
        except ValueError:  # an empty cell
            continue
        if callable(inner) and str(getattr(inner, "__module__", "")).startswith(
                "transformer_lens.model_bridge"):
            return True
    return False


def user_hooks(model: Model) -> dict[str, int]:
    """Hook name (DePass's canonical one) -> how many forward hooks and forward pre-hooks sit on
    that hook point, for every hook point that has any. Called before DePass adds its own, so
    these are the user's (`model.hooks(...)`, `add_hook`, `register_forward_hook`)."""
    names = canonical_names(model)
    out: dict[str, int] = {}
    for name, point in model.hook_dict.items():
        hooks = [*point._forward_hooks.values(), *point._forward_pre_hooks.values()]
        n = sum(not bridge_wiring(h) for h in hooks)
        if n:
            out[names.get(name, name)] = n
    return out


def replaced_hooks(model: Model, attn: Iterable[str], mlps: Iterable) -> list[str]:
    """Hook points where the decomposed pass (and the frozen model) computes the value itself,
    ignoring whatever a hook there returned: each replayed attention's `hook_z` (rebuilt from
    the clean pattern and each component's values) and a gated MLP's activation (rebuilt as
    act_fn(gate) * up). Everything else a user's hook changes is kept: frozen values (patterns,
    norm scales, plain MLP activations) are recorded after the user's hooks ran, and hooks on
    the residual stream, values, pre-activations and outputs run on every component."""
    gated = [s.act_hook for s in mlps if model.cfg.gated_mlp and s.act_hook.endswith("hook_post")]
    return [f"{a}.hook_z" for a in attn] + gated


def check_user_hooks(model: Model, replaced: Iterable[str]) -> dict[str, int]:
    """Refuse the user's hooks at `replaced` hook points (see `replaced_hooks`); return all the
    user's hooks (for `check_complete`)."""
    found = user_hooks(model)
    bad = [n for n in dict.fromkeys(replaced) if n in found]
    if bad:
        raise DepassError(
            f"the model has a hook of yours at {', '.join(bad)}, where the decomposed pass sets "
            "the value itself, so your hook would be silently skipped: remove it, or fold its "
            "effect into the model (e.g. into W_O for hook_z, or the MLP weights)"
        )
    return found


def check_complete(dec, found: dict[str, int]):
    """With user hooks on the model, `dec` must still be complete: a hook that is not linear in
    the activation (one that adds a constant to the residual stream, clamps, ...) gives each
    component its own non-linear share, and the shares no longer sum to the clean run."""
    if not found:
        return dec
    tol = completeness_rtol(dec.clean_logits.dtype)
    off = {k: e for k, e in dec.completeness_error().items() if not e <= tol}
    if off:
        worst = max(off, key=off.get)
        raise DepassError(
            f"with your hooks at {', '.join(sorted(found))} the components do not sum to the "
            f"clean run (relative error {off[worst]:.1e} at {worst}): a hook that changes values "
            "where DePass decomposes must be linear in the activation (scale, project, zero). "
            "Remove it, or fold its effect into the model"
        )
    return dec
