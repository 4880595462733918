"""Chunks of components that run together: one thread per chunk, each its own folded forward,
meeting at every MLP to combine the non-linear rule's statistics.

A chunked run of the softmax/max rules otherwise sweeps the chunks once per MLP layer before the
forwards that keep values (engine/sweep.py), because each MLP's statistics need every component's
share there. Run together, the chunks meet at each MLP instead (a barrier; the statistics are
combined in chunk order, as the sweep combines them, so the results are the same bit for bit),
and nothing is run twice. What this buys: chunks of token components skip the positions before
their first component (`sweep.window`), so a set of windowed chunks does about half the work of
one forward holding every component, for every rule. Memory: all chunks are alive at once (about
half of one forward's), so `decompose` runs chunks together only when one forward would fit.

Hooks and fast paths are installed once, for all threads: each hook dispatches to the folded
forward of the thread that calls it.
"""

import threading
from functools import partial

import torch
from jaxtyping import Int
from torch import Tensor

from tl_depass.engine import rules
from tl_depass.engine.backends import Model
from tl_depass.engine.replay import FoldedForward, replaying


class Meeting:
    """Where the chunks' statistics meet: each thread leaves its part and gets the total."""

    def __init__(self, rule: rules.Rule, n: int):
        self.rule, self.parts, self.total = rule, [None] * n, None
        self.barrier = threading.Barrier(n, action=self.combine)

    def combine(self) -> None:  # in one thread, once every part is in
        total = None
        for part in self.parts:
            total = rules.combine(self.rule, total, part)
        self.total = total

    def exchange(self, i: int, part: rules.Stats) -> rules.Stats:
        self.parts[i] = part
        self.barrier.wait()
        return self.total


def run_together(model: Model, tokens: Int[Tensor, "batch pos"], mask: Tensor | None,
                 forwards: list[FoldedForward]) -> list[dict[str, Tensor]]:
    """The kept values of every forward (`FoldedForward.kept`), all run at once."""
    local = threading.local()
    meeting = Meeting(forwards[0].setup.rule, len(forwards))
    outs: list[dict] = [{} for _ in forwards]
    fast = forwards[0].fast()
    tables = [f.hooks(out, None, fast) for f, out in zip(forwards, outs, strict=True)]
    errors: list[BaseException] = []

    def dispatch(i: int, x: Tensor, hook) -> Tensor | None:
        return local.hooks[i][1](x, hook)

    def work(i: int) -> None:
        local.forward, local.hooks = forwards[i], tables[i]
        forwards[i].meet = partial(meeting.exchange, i)
        try:
            folded, options = forwards[i].inputs(tokens, mask)
            with torch.no_grad():
                model(folded, **options)
        except BaseException as e:  # noqa: BLE001 - re-raised in the calling thread
            errors.append(e)
            meeting.barrier.abort()  # the others stop waiting for this chunk
        finally:
            forwards[i].meet = None

    hooks = [(name, partial(dispatch, i)) for i, (name, _) in enumerate(tables[0])]
    with replaying(model, forwards[0].plan, fast,
                   lambda module, args, out: local.forward.norm_hook(module, args, out),
                   lambda attn: lambda v: local.forward.attend(attn)(v), hooks):
        threads = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(len(forwards))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    if errors:
        raise next((e for e in errors if not isinstance(e, threading.BrokenBarrierError)), errors[0])
    return outs
