"""run_dataset(): one attribution per prompt over a dataset, in batches, to a table.

Prompts are batched with right padding and an attention mask, grouped by length (and by whether
they have a wrong answer) so that little is padding; each batch goes through the public
`tl_depass.attribute`: its backward path where the rule is the linear `ratio`, its forward path
(decompose) otherwise; each group's rest and bias are rows on both. With `out=`, every batch is
a shard on disk and a rerun resumes; under torchrun the ranks share out the batches.
"""

import hashlib
import json
import os
import signal
from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd
import torch
from torch import Tensor
from tqdm.auto import tqdm

from tl_depass.attribute import attribute
from tl_depass.dataset import distributed
from tl_depass.dataset.rows import COLUMNS, LEVELS, frame, structured
from tl_depass.dataset.shards import Store, merged
from tl_depass.engine.backends import Model, check_model
from tl_depass.engine.validate import check_options, check_text, token_of
from tl_depass.errors import DepassError
from tl_depass.levels.components import as_components
from tl_depass.memory import estimate_memory
from tl_depass.saving import model_facts

#: Test hook: a process that has written this many shards kills itself (SIGKILL), as an
#: interrupted run would stop, at a point a test can rely on.
STOP_AFTER = "TL_DEPASS_DATASET_STOP_AFTER"
MAX_AUTO_BATCH = 64


@dataclass(frozen=True)
class Item:
    tokens: tuple[int, ...]
    target: int
    wrong: int | None


def run_dataset(model: Model, prompts: Sequence[str | Tensor | Sequence[int]],
                components: object = "tokens", *, answers: Sequence | Tensor,
                wrong: Sequence | Tensor | None = None, mlp_rule: str = "softmax",
                batch_size: int | None = None, out: str | os.PathLike | None = None,
                method: str = "auto", progress: bool = True) -> pd.DataFrame:
    """Each component's share of `logit[answer] - logit[wrong]` (of `logit[answer]` where a
    prompt has no wrong answer: None in `wrong`) at each prompt's last token, as a table with
    one row per (prompt, component); see `tl_depass.dataset.rows` for the columns.

    `prompts`: strings (tokenised with the model's tokenizer) or token ids, one per prompt;
    `answers` / `wrong`: one token (id or string) per prompt. `components`: "tokens",
    TokensAt(layer), Heads(), Modules() or Neurons(layer). `batch_size=None`: the largest that
    `estimate_memory` says fits (at most 64). `out`: a directory for shards, the manifest
    (`meta.json`) and `scores.parquet`; rerunning the same call resumes there. Under torchrun
    (or an initialised process group) the ranks split the batches and every rank returns the
    merged table; `out` is then needed, on a filesystem every rank sees.

    `method="auto"` takes attribute's backward path where the rule is the linear "ratio" (one
    clean forward, one frozen forward and one backward per batch, whatever the number of
    components) and its forward path (decompose) otherwise; `method="forward"` takes the forward
    path for "ratio" too. Both give the same rows: the named components and each group's rest
    and bias, as decompose has them."""
    check_model(model)
    check_options(model, mlp_rule, 0.1, None)
    spec = as_components(components, model)
    if not isinstance(spec, LEVELS):
        raise DepassError(f"run_dataset takes 'tokens', TokensAt, Heads, Modules or Neurons, not "
                          f"{spec!r}: run tl_depass.decompose per batch for other levels")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int)
                                   or batch_size < 1):
        raise DepassError(f"batch_size must be a positive int or None (chosen for memory), got "
                          f"{batch_size!r}")
    if method not in ("auto", "forward", "backward"):
        raise DepassError(f"unknown method {method!r}; use 'auto', 'forward' or 'backward'")
    if method == "backward" and mlp_rule != "ratio":
        raise DepassError(f"the backward path is exact only for the linear rule; mlp_rule="
                          f"{mlp_rule!r} needs method='forward' (or 'auto')")
    items = prepare(model, prompts, answers, wrong)
    if method == "auto":
        method = "backward" if mlp_rule == "ratio" else "forward"
    options = json.loads(json.dumps({
        "components": repr(spec), "mlp_rule": mlp_rule, "method": method,
        "model": model_facts(model), "dtype": str(next(model.parameters()).dtype),
        "prompts": len(items), "data_sha256": digest(items)}))

    def plan() -> tuple[int, list[list[int]]]:
        size = batch_size or auto_batch_size(model, spec, items, mlp_rule)
        return size, batch_plan(items, size)

    ranks = distributed.start()
    try:
        if out is None:
            if ranks.world > 1:
                raise DepassError("run_dataset over several ranks needs out= (a directory every "
                                  "rank sees): the ranks meet there")
            _, batches = plan()
            frames = [score_batch(model, spec, method, mlp_rule, items, b)
                      for b in progress_bar(batches, items, [], progress)]
            return merged(frames)[COLUMNS]
        store = Store(out)
        distributed.together(ranks, lambda: store.open(options, batch_size, plan), on_every_rank=False)
        batches = store.plan()["batches"]
        mine = [i for i in range(len(batches)) if i % ranks.world == ranks.rank]
        done = [i for i in mine if store.done(i)]
        todo = [i for i in mine if i not in done]

        def work():
            stop_after, written = int(os.environ.get(STOP_AFTER, "0")), 0
            bar = progress_bar([batches[i] for i in todo], items, [batches[i] for i in done],
                               progress and ranks.rank == 0)
            for i, batch in zip(todo, bar, strict=True):
                store.write(i, score_batch(model, spec, method, mlp_rule, items, batch))
                written += 1
                if written == stop_after:
                    os.kill(os.getpid(), signal.SIGKILL)

        distributed.together(ranks, work)
        distributed.together(ranks, lambda: store.merge(len(batches)), on_every_rank=False)
        return store.table()
    finally:
        distributed.stop(ranks)


def progress_bar(batches: list[list[int]], items, done: list[list[int]], show: bool):
    """Yields `batches`; one bar over prompts (those `done` counted from the start)."""
    with tqdm(total=len(items), initial=sum(map(len, done)), unit="prompt",
              disable=not show) as bar:
        for batch in batches:
            yield batch
            bar.update(len(batch))


def prepare(model: Model, prompts, answers, wrong) -> list[Item]:
    """Each prompt's token ids, answer and wrong answer, checked, with the prompt's index in
    every message."""
    n = len(prompts)
    if n == 0:
        raise DepassError("no prompts: pass at least one")
    answers = list(answers.tolist() if isinstance(answers, Tensor) else answers)
    wrong = [None] * n if wrong is None else list(wrong.tolist() if isinstance(wrong, Tensor)
                                                   else wrong)
    if len(answers) != n or len(wrong) != n:
        raise DepassError(f"{n} prompts but {len(answers)} answers and {len(wrong)} wrong answers: "
                          "pass one of each per prompt (None in wrong= for none)")
    out = []
    for i, (prompt, a, w) in enumerate(zip(prompts, answers, wrong, strict=True)):
        try:
            out.append(one_prompt(model, prompt, a, w))
        except DepassError as e:
            raise DepassError(f"prompt {i}: {e}") from None
    return out


def one_prompt(model: Model, prompt, answer, wrong) -> Item:
    if isinstance(prompt, str):
        if model.tokenizer is None:
            raise DepassError("a string prompt needs a tokenizer; pass token ids")
        check_text(model, prompt)
        ids = model.to_tokens(prompt, truncate=False)[0].tolist()
    else:
        ids = torch.as_tensor(prompt).reshape(-1).tolist()
        if not ids or not all(isinstance(t, int) and 0 <= t < model.cfg.d_vocab for t in ids):
            raise DepassError(f"token ids must be ints in [0, {model.cfg.d_vocab}), at least one")
    if len(ids) > model.cfg.n_ctx:
        raise DepassError(f"{len(ids)} tokens, more than the model's n_ctx={model.cfg.n_ctx}")

    def token(value, what):
        t = token_of(model, value, what) if isinstance(value, str) else value
        if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < model.cfg.d_vocab:
            raise DepassError(f"the {what} {value!r} is not a token id in [0, {model.cfg.d_vocab})")
        return t

    target = token(answer, "answer")
    other = None if wrong is None else token(wrong, "wrong answer")
    if other == target:
        raise DepassError(f"the wrong answer is the answer ({answer!r}): their logit difference is "
                          "0; pass another wrong answer, or None")
    return Item(tuple(ids), target, other)


def digest(items: list[Item]) -> str:
    return hashlib.sha256(json.dumps([[p.tokens, p.target, p.wrong] for p in items]).encode()
                          ).hexdigest()


def batch_plan(items: list[Item], batch_size: int) -> list[list[int]]:
    """Batches of prompt indices: sorted by (has a wrong answer, length), so that a batch holds
    prompts of about one length and one readout."""
    order = sorted(range(len(items)), key=lambda i: (items[i].wrong is not None,
                                                     len(items[i].tokens), i))
    batches: list[list[int]] = []
    for i in order:
        last = batches[-1] if batches else None
        if (last is None or len(last) == batch_size
                or (items[last[0]].wrong is None) != (items[i].wrong is None)):
            batches.append([i])
        else:
            last.append(i)
    return batches


def auto_batch_size(model: Model, spec, items: list[Item], mlp_rule: str) -> int:
    """The largest power of two (at most 64, and the number of prompts) whose batch of the
    longest prompt `estimate_memory` fits in half the free memory in one forward. The forward
    path's estimate: more than the backward path needs."""
    n_pos, cap = max(len(p.tokens) for p in items), min(MAX_AUTO_BATCH, len(items))
    device = next(model.parameters()).device

    def fits(b):
        est = estimate_memory(model, torch.zeros(b, n_pos, dtype=torch.long, device=device), spec,
                              mlp_rule=mlp_rule, keep=[], logits="last")
        return est.available is None or (est.chunk_size is None and 2 * est.total <= est.available)

    size = 1
    while 2 * size <= cap and fits(2 * size):
        size *= 2
    return size


def score_batch(model: Model, spec, method: str, mlp_rule: str, items: list[Item],
                batch: list[int]) -> pd.DataFrame:
    """The table rows of the prompts `batch` (indices into `items`)."""
    chosen = [items[i] for i in batch]
    lengths = [len(p.tokens) for p in chosen]
    device = next(model.parameters()).device
    tokens = torch.zeros(len(chosen), max(lengths), dtype=torch.long)
    for row, p in enumerate(chosen):
        tokens[row, :len(p.tokens)] = torch.tensor(p.tokens)
    tokens = tokens.to(device)
    at = torch.tensor(lengths, device=device) - 1
    mask = None if min(lengths) == max(lengths) else (
        torch.arange(max(lengths), device=device)[None] <= at[:, None]).long()
    target = torch.tensor([p.target for p in chosen], device=device)
    has_wrong = chosen[0].wrong is not None  # batch_plan keeps batches of one kind
    wrong = torch.tensor([p.wrong for p in chosen], device=device) if has_wrong else None
    att = attribute(model, tokens, spec, answer=target, wrong=wrong, pos=at, mlp_rule=mlp_rule,
                    attention_mask=mask, method=method)
    labels, scores = att.with_rest_and_bias()  # the clean metric came with it: no other forward
    return frame(batch, lengths, structured(labels), scores, att.metric, has_wrong)

