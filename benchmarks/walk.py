"""The walk of `decompose(model, tokens, Heads())` through the package: which tl_depass modules it
passes through, the module-to-module calls it makes, and the pairs of modules that call each
other (a call that climbs back up a layer). A measure of the layering, not of speed.

    python benchmarks/walk.py
"""

import sys
from pathlib import Path

import torch

import tl_depass

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from tiny import make_model  # noqa: E402


def walk() -> set[tuple[str, str]]:
    model = make_model(n_layers=2)
    tokens = torch.randint(0, model.cfg.d_vocab, (1, 6), generator=torch.Generator().manual_seed(0))
    edges = set()

    def ours(frame) -> str:
        return frame.f_globals.get("__name__", "") if frame is not None else ""

    def tracer(frame, event, arg):
        if event == "call" and ours(frame).startswith("tl_depass"):
            caller = frame.f_back
            while caller is not None and not ours(caller).startswith("tl_depass"):
                caller = caller.f_back
            if caller is not None and ours(caller) != ours(frame):
                edges.add((ours(caller), ours(frame)))
        return None

    sys.settrace(tracer)
    try:
        tl_depass.decompose(model, tokens, tl_depass.Heads())
    finally:
        sys.settrace(None)
    return edges


if __name__ == "__main__":
    edges = walk()
    short = lambda m: m.removeprefix("tl_depass.")  # noqa: E731
    modules = sorted({m for e in edges for m in e})
    mutual = sorted({tuple(sorted(e)) for e in edges if e[::-1] in edges})
    print(f"modules passed through: {len(modules)}: {', '.join(map(short, modules))}")
    print(f"module-to-module calls: {len(edges)}")
    print(f"pairs calling each other: {len(mutual)}: "
          + "; ".join(f"{short(a)} <-> {short(b)}" for a, b in mutual))
