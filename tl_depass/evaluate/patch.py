"""One patcher: set part of an activation to zero, or to another run's value, at any hook point,
for one forward or for many units at once (each unit in its own copy of the batch).

TransformerLens's `patching` module restores one clean activation at a time in a corrupted run
(`compare.with_patching` uses it). This covers what it does not: zero ablation, ablation inside
the frozen model (its hooks passed as `hooks`), k units folded into one forward as k copies of the
batch, several patches at once (top-k ablation), and gradients through a replaced activation.
Hooks are added only inside `model.hooks(...)`, which removes them on the way out, also after an
exception; a hook finds its patches under the name it was registered with (a TransformerBridge's
`hook.name` may be an alias).
"""

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

import torch
from jaxtyping import Float, Int
from torch import Tensor

from tl_depass.engine.backends import Model
from tl_depass.engine.hooks import attn_z, block_hook
from tl_depass.errors import DepassError

Hook = tuple[str, Callable]
Metric = Callable[[Tensor], Tensor]


@dataclass(frozen=True, eq=False)
class Patch:
    """Set `activation[:, *index]` at `hook` to `source[:, *index]`, or to zero when `source` is
    None. `index` leaves out the batch axis: `(slice(None), 2)` is head 2 of `attn.hook_z` at every
    position, `(Ellipsis, 7)` neuron 7 of `mlp.hook_post`, `(4,)` position 4 of a residual, `()`
    the whole activation. `source` has the activation's shape: another run's activation (from a
    cache), or a tensor to differentiate through."""

    hook: str
    index: tuple = ()
    source: Tensor | None = None


Unit = Patch | Sequence[Patch]  # what one copy of the batch gets: one patch or several together


def head(layer: int, head_index: int, source: Tensor | None = None) -> Patch:
    """Head `head_index` of `layer` (its `hook_z`) at every position."""
    return Patch(attn_z(layer), (slice(None), head_index), source)


def neuron(layer: int, index: int, source: Tensor | None = None) -> Patch:
    """Neuron `index` of `layer` (its `mlp.hook_post`) at every position."""
    return Patch(block_hook(layer, "mlp.hook_post"), (Ellipsis, index), source)


def _apply(x: Tensor, hook, todo: list[tuple[int, Patch]], copies: int, name: str) -> Tensor:
    folded = x.reshape(copies, x.shape[0] // copies, *x.shape[1:]).clone()
    for copy, patch in todo:
        at = (copy, slice(None), *patch.index)
        if patch.source is None:
            folded[at] = 0
            continue
        if patch.source.shape != folded.shape[1:]:
            raise DepassError(f"the patch at {name} has a source of shape {tuple(patch.source.shape)} "
                              f"but the activation is {tuple(folded.shape[1:])}: patch from a run "
                              "on tokens of the same shape (same batch and length)")
        folded[at] = patch.source.to(x)[(slice(None), *patch.index)]
    return folded.reshape(x.shape)


def hooks(units: Sequence[Unit]) -> list[Hook]:
    """Forward hooks that apply `units[i]` to the i-th of `len(units)` copies of the batch (the
    model's input is the batch repeated, copy-major); one hook per hook point."""
    todo: dict[str, list[tuple[int, Patch]]] = {}
    for copy, unit in enumerate(units):
        for patch in [unit] if isinstance(unit, Patch) else unit:
            todo.setdefault(patch.hook, []).append((copy, patch))
    return [(name, partial(_apply, todo=found, copies=len(units), name=name))
            for name, found in todo.items()]


@contextmanager
def patched(model: Model, units: Sequence[Unit], extra: Sequence[Hook] = ()) -> Iterator[Model]:
    """Inside, `model` runs with `units` patched (copy i of the batch gets units[i]) after the
    `extra` hooks at the same points. Every hook is removed on the way out."""
    with model.hooks(fwd_hooks=[*extra, *hooks(units)]):
        yield model


def run(model: Model, tokens: Int[Tensor, "batch pos"], patches: Sequence[Patch],
        extra: Sequence[Hook] = ()) -> Float[Tensor, "batch pos d_vocab"]:
    """The logits with every patch in `patches` applied together (gradients flow through)."""
    with patched(model, [patches], extra):
        return model(tokens)


def patch_each(model: Model, tokens: Int[Tensor, "batch pos"], units: Sequence[Unit],
               metric: Metric, chunk: int = 64, extra: Sequence[Hook] = ()
               ) -> Float[Tensor, " unit"]:
    """metric(logits with units[i] patched) for each unit, without gradients; `chunk` units ride
    in one forward as copies of the batch. The `extra` hooks (the frozen model's, say) are added
    to every forward and see the folded batch: hooks that hold per-prompt values need chunk=1."""
    if chunk < 1:
        raise DepassError(f"chunk must be a positive number of units per forward, got {chunk}")
    batch, out = tokens.shape[0], []
    with torch.no_grad():
        for start in range(0, len(units), chunk):
            part = units[start:start + chunk]
            with patched(model, part, extra):
                logits = model(tokens.repeat(len(part), 1) if len(part) > 1 else tokens)
            out += [metric(rows) for rows in logits.reshape(len(part), batch, *logits.shape[1:])]
    return torch.stack(out)


__all__ = ["Patch", "Unit", "head", "hooks", "neuron", "patch_each", "patched", "run"]
