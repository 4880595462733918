"""Real code completions for the natural-text protocol: `pystdlib` on its held-out files.

The prompts are windows of real code that no one wrote for the test: the held-out files of the
model's pinned corpus (`tl_depass.models.corpus`, the files listed in the model's JSON manifest),
cut into every window of `length` tokens at a stride of `stride` tokens within one file (BOS
first, then `length − 1` tokens of the file); the answer is the token the file continues with.
The candidate windows are shuffled (seeded) and scored in that order; a window is kept when the
model gets the next token right with a margin: the answer is its top-1 token and its logit beats
the runner-up's by at least `margin`. The competitor (`wrong`) is that runner-up, the token the
model would pick if the answer were not there. Real text has no ground-truth key positions
(`key_positions` is None: a hit rate is not defined), and no minimal-pair corruption: the
`corrupted` prompt of each window is the next kept window (a different piece of real code of the
same length, the "resample" baseline of activation patching).

    batch = completions.make(model, 256, seed=0)
    batch.tokens, batch.answers, batch.wrong, batch.corrupted, batch.texts, batch.scored
"""

import random
from dataclasses import dataclass
from pathlib import Path

import torch
from jaxtyping import Float, Int
from torch import Tensor

from tl_depass.engine.backends import Model
from tl_depass.errors import DepassError
from tl_depass.models import corpus

LENGTH = 32  # tokens per prompt, BOS included (pystdlib's context is 128)
STRIDE = 7  # candidate windows start every STRIDE tokens of a file
MARGIN = 2.0  # logit(answer) − logit(runner-up) at least this (and the answer is top-1)
CHUNK = 256  # candidates scored per forward pass


@dataclass(frozen=True)
class Completions:
    """Real code completions the model gets right, shaped like `tl_depass.models.tasks.TaskBatch`."""

    tokens: Int[Tensor, "batch pos"]  # BOS, then LENGTH − 1 tokens of a held-out file
    answers: Int[Tensor, " batch"]  # the token the file continues with (the model's top-1)
    wrong: Int[Tensor, " batch"]  # the model's runner-up token
    corrupted: Int[Tensor, "batch pos"]  # the next kept window (resample corruption)
    margin: Float[Tensor, " batch"]  # logit(answer) − logit(wrong), clean
    texts: list[str]  # the decoded prompts (without BOS)
    scored: int  # candidate windows scored to find these
    files: int  # held-out files read
    key_positions: None = None  # real text: no ground truth, hit rate not defined

    def __len__(self) -> int:
        return self.tokens.shape[0]


def held_out_streams(model: Model, paths: list[str], root=None) -> list[Tensor]:
    """The token ids of each held-out file that exists here (no BOS), in the manifest's order."""
    base = corpus.stdlib_root() if root is None else Path(root)
    return [torch.tensor(model.tokenizer.encode(corpus.read(p, root), add_special_tokens=False))
            for p in paths if (base / p).is_file()]


def candidates(streams: list[Tensor], length: int, stride: int, seed: int) -> list[tuple[int, int]]:
    """(file, start) of every window of `length − 1` tokens plus its answer, shuffled by `seed`."""
    out = [(f, s) for f, stream in enumerate(streams) for s in range(0, len(stream) - length + 1, stride)]
    random.Random(seed).shuffle(out)
    return out


def make(model: Model, n: int, seed: int = 0, name: str = "pystdlib", length: int = LENGTH,
         stride: int = STRIDE, margin: float = MARGIN, paths: list[str] | None = None, root=None
         ) -> Completions:
    """`n` real code completions from the held-out files of `model`'s corpus (`paths`: default
    the held-out list in the corpus manifest of the bundled model `name`; `root`: default this
    interpreter's standard library), deterministic given `seed`: see the module docstring for
    the filter."""
    if n < 2:
        raise DepassError(f"completions.make: need n >= 2 prompts (each one's corruption is "
                          f"another), got {n}; ask for more")
    if length < 3 or length > model.cfg.n_ctx:
        raise DepassError(f"length must be in [3, n_ctx={model.cfg.n_ctx}], got {length}")
    if paths is None:
        from tl_depass import models

        paths = models.info(name)["corpus"]["held_out"]
    streams = held_out_streams(model, paths, root)
    if not streams:
        raise DepassError(f"none of the {len(paths)} held-out files exists under "
                          f"{corpus.stdlib_root() if root is None else root}; pass root= the folder "
                          "of the standard library the model was trained on")
    bos = model.tokenizer.bos_token_id
    cands = candidates(streams, length, stride, seed)
    kept: list[tuple[Tensor, int, int, float]] = []
    scored = 0
    for i in range(0, len(cands), CHUNK):
        part = cands[i:i + CHUNK]
        tokens = torch.stack([torch.cat([torch.tensor([bos]), streams[f][s:s + length - 1]])
                              for f, s in part])
        answers = torch.stack([streams[f][s + length - 1] for f, s in part])
        with torch.no_grad():
            top = model(tokens.to(model.cfg.device))[:, -1].float().topk(2, dim=-1)
        values, ids = top.values.cpu(), top.indices.cpu()
        gap = values[:, 0] - values[:, 1]
        for j in range(len(part)):
            scored += 1
            if ids[j, 0] == answers[j] and gap[j] >= margin:
                kept.append((tokens[j], int(answers[j]), int(ids[j, 1]), float(gap[j])))
                if len(kept) == n:
                    break
        if len(kept) == n:
            break
    if len(kept) < n:
        raise DepassError(f"only {len(kept)} of {scored} held-out windows pass the filter (top-1 "
                          f"and a logit margin of {margin}); ask for fewer prompts or a lower margin")
    tokens = torch.stack([k[0] for k in kept])
    return Completions(tokens=tokens, answers=torch.tensor([k[1] for k in kept]),
                       wrong=torch.tensor([k[2] for k in kept]), corrupted=tokens.roll(-1, 0),
                       margin=torch.tensor([k[3] for k in kept]),
                       texts=[model.tokenizer.decode(t[1:].tolist()) for t in tokens],
                       scored=scored, files=len(streams))


def describe(batch: Completions, length: int = LENGTH, stride: int = STRIDE, margin: float = MARGIN,
             seed: int = 0) -> str:
    """One paragraph for docs/results.md: where the prompts come from and how many passed."""
    return (f"Natural-text protocol: {len(batch)} real code completions "
            f"(`tl_depass.evaluate.completions.make(model, {len(batch)}, seed={seed})`): windows of "
            f"{length} tokens (BOS + {length - 1}) of the {batch.files} held-out files of the pinned "
            f"corpus, every {stride} tokens, shuffled; kept when the file's next token is the model's "
            f"top-1 with a logit margin ≥ {margin:g} over the runner-up ({len(batch)} of the "
            f"{batch.scored} windows scored passed, {len(batch) / batch.scored:.1%}; median margin "
            f"{batch.margin.median():.2f}). Competitor (`wrong`): the runner-up token. Corrupted "
            "prompt (for AtP and exact patching vs corrupted): the next kept window, another piece "
            "of real code. Real text has no ground-truth key positions: the hit rate is not "
            "defined, so the token protocol reports the curves and AOPCs only.")


__all__ = ["LENGTH", "MARGIN", "STRIDE", "Completions", "candidates", "describe", "held_out_streams",
           "make"]
