"""Chunks of components in lockstep: one thread per chunk, each its own (windowed) folded forward,
taking turns so that only one runs at a time, and meeting at every MLP to combine the non-linear
rule's statistics.

Chunked runs of the softmax/max rules otherwise sweep the chunks once per MLP layer before the
forwards that keep values (engine/sweep.py `statistics`), because each MLP's statistics need
every component's share there. In lockstep nothing runs twice, so chunks of token components,
which skip the positions before their first component (`sweep.window`), do about (1 + 1/c)/2 of
one forward's work for c chunks. Memory: the chunks wait at an MLP with their live values
(together about those of one forward over the windows), one chunk runs at a time, and each kept
value is written into the results as it is kept (`FoldedForward.sink`), so the peak stays below
one forward's. (Each thread allocates from its own malloc arena, which keeps freed memory for
the next call's threads: a process's resident memory after a call is not its peak.)

Threads, not coroutines: the state a thread keeps for its own (torch's grad mode, jaxtyping's
shape memos) then stays each chunk's. The hooks, fast paths and norm hooks are installed once, for
every thread: each dispatches to the folded forward of the thread that calls it. HookedTransformer
forwards from the tokens only (`lockstep`).
"""

import threading
from collections.abc import Callable

import torch
from jaxtyping import Int
from torch import Tensor

from tl_depass.engine import rules
from tl_depass.engine.backends import Model, forward_as_recorded, is_bridge
from tl_depass.engine.fast import skipping_frozen
from tl_depass.engine.plan import Plan
from tl_depass.engine.replay import FoldedForward


def lockstep(model: Model, plan: Plan, rule: rules.Rule) -> bool:
    """Whether the chunks of `plan` can run in lockstep: a non-linear rule (the linear one needs
    no statistics), a HookedTransformer on the CPU, forwards from the tokens."""
    on_cpu = next(model.parameters()).device.type == "cpu"
    return (rule != "ratio" and not is_bridge(model) and on_cpu
            and not plan.start_layer and plan.through is None)


class Abandoned(Exception):
    """Another chunk failed: this one stops where it waits."""


class Turns:
    """Threads 0..n-1 run one at a time, in order, each until it meets the others at an MLP
    (`exchange`) or ends; the last to arrive at an MLP combines the statistics in chunk order."""

    def __init__(self, rule: rules.Rule, n: int):
        self.rule, self.n, self.turn = rule, n, 0
        self.parts: list[rules.Stats | None] = [None] * n
        self.total: rules.Stats | None = None
        self.error: BaseException | None = None
        self.cond = threading.Condition()

    def wait(self, i: int) -> None:
        self.cond.wait_for(lambda: self.turn == i or self.error is not None)
        if self.error is not None:
            raise Abandoned

    def begin(self, i: int) -> None:
        with self.cond:
            self.wait(i)

    def pass_on(self, i: int) -> None:
        self.turn = (i + 1) % self.n
        self.cond.notify_all()

    def exchange(self, i: int, part: rules.Stats) -> rules.Stats:
        """Chunk i's statistics at an MLP (every position) -> all chunks'."""
        with self.cond:
            self.parts[i] = part
            if i == self.n - 1:
                total = None
                for p in self.parts:
                    total = rules.combine(self.rule, total, p)
                self.total, self.parts = total, [None] * self.n
            self.pass_on(i)
            self.wait(i)
            return self.total

    def end(self, i: int) -> None:
        with self.cond:
            self.pass_on(i)

    def fail(self, error: BaseException) -> None:
        with self.cond:
            self.error = self.error or error
            self.cond.notify_all()


def run_together(model: Model, tokens: Int[Tensor, "batch pos"], mask: Tensor | None,
                 forwards: list[FoldedForward], sink: Callable[[FoldedForward], Callable]) -> None:
    """Run `forwards` (chunks of one plan, `lockstep`) in lockstep; `sink(forward)` takes each
    of its kept values as it is kept."""
    local, turns = threading.local(), Turns(forwards[0].setup.rule, len(forwards))
    p = forwards[0].plan
    fast = forwards[0].fast_paths()
    tables = [f.hooks({}, None, fast) for f in forwards]
    hooks = [(name, lambda x, hook, j=j: local.table[j][1](x, hook)) for j, (name, _) in enumerate(tables[0])]
    for i, f in enumerate(forwards):
        f.meet, f.sink = (lambda part, i=i: turns.exchange(i, part)), sink(f)

    def work(i: int) -> None:
        f = local.forward = forwards[i]
        local.table = tables[i]
        try:
            turns.begin(i)
            folded = tokens[:, f.window:].repeat(f.slots, 1)
            with torch.no_grad():
                model(folded, attention_mask=None if mask is None else mask[:, f.window:].repeat(f.slots, 1))
            turns.end(i)
        except BaseException as e:  # noqa: BLE001 - re-raised in the calling thread
            turns.fail(e)

    norms = [model.get_submodule(n).register_forward_hook(
        lambda module, args, out: local.forward.norm_hook(module, args, out))
        for n in p.norms if n not in fast.norms]
    threads = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(len(forwards))]
    try:
        with forward_as_recorded(model), model.hooks(fwd_hooks=hooks), skipping_frozen(
                model, fast, lambda attn: lambda v: local.forward.attend(attn)(v),
                lambda x, b: local.forward.add_bias(x, b)):
            try:
                for t in threads:
                    t.start()
            finally:  # also on an interrupt: no thread is left waiting
                for t in threads:
                    while t.is_alive():
                        try:
                            t.join()
                        except BaseException as e:  # noqa: BLE001 - re-raised below
                            turns.fail(e)
    finally:
        for h in norms:
            h.remove()
        for f in forwards:
            f.meet = f.sink = None
    if turns.error is not None:
        raise turns.error
