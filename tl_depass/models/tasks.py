"""Task generators for the bundled models (`tl_depass.models`): prompts whose mechanism is known.

    batch = tl_depass.models.tasks.generate("induction", 64, seed=0)
    batch.tokens, batch.answers, batch.wrong, batch.corrupted, batch.key_positions

Every prompt starts with BOS, all prompts of a task have the same length, and the answer is the
next token at the LAST position. Token ids index `VOCAB[name]`, the bundled model's vocabulary
(`model.to_str_tokens` shows them as words). Same name, n and seed: the same batch.
"""

from dataclasses import dataclass

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from tl_depass.errors import DepassError

BOS, PAD = "<bos>", "<pad>"

TASKS: dict[str, str] = {
    "induction": "repeated random tokens: predict the token that followed the current token's "
                 "earlier occurrence",
    "recall": "a subject among distractor tokens, then '?': name the subject's attribute from a "
              "fixed (seeded) table",
    "ioi": "two names, one repeated ('When A and B went to the store , B gave a drink to'): "
           "predict the other name",
}

# --- vocabularies (the bundled models' token strings, BOS first) ---
INDUCTION_SYMBOLS = [f"t{i}" for i in range(48)]
RECALL_SUBJECTS = [f"s{i}" for i in range(32)]
RECALL_ATTRIBUTES = ["red", "green", "blue", "yellow", "black", "white", "orange", "purple"]
RECALL_DISTRACTORS = [f"d{i}" for i in range(24)]
NAMES = ["Mary", "John", "Anna", "Tom", "Lisa", "Paul", "Kate", "Mark", "Emma", "Jack", "Sara",
         "Dan", "Lucy", "Sam", "Nina", "Ben", "Rose", "Alex", "Ruth", "Eric"]
IOI_TEMPLATES = [  # A and B are the first two names, S the repeated one; 14 tokens after BOS
    "When A and B went to the PLACE , S gave a OBJECT to",
    "When A and B were at the PLACE , S gave a OBJECT to",
    "A and B went to the PLACE . Then S gave a OBJECT to",
    "A and B were at the PLACE . Then S gave a OBJECT to",
]
PLACES = ["store", "park", "school", "office", "beach", "station"]
OBJECTS = ["drink", "book", "ring", "ball", "gift", "key"]
IOI_WORDS = sorted({w for t in IOI_TEMPLATES for w in t.split() if w not in ("A", "B", "S",
                                                                             "PLACE", "OBJECT")})

VOCAB: dict[str, list[str]] = {
    "induction": [BOS, PAD] + INDUCTION_SYMBOLS,
    "recall": [BOS, PAD, "?"] + RECALL_SUBJECTS + RECALL_ATTRIBUTES + RECALL_DISTRACTORS,
    "ioi": [BOS, PAD] + NAMES + IOI_WORDS + PLACES + OBJECTS,
}

INDUCTION_LENGTH = 16  # BOS, L random tokens (8 <= L <= 14), then the first 15 - L of them again
RECALL_CONTEXT = 8  # BOS, 8 tokens (one subject, 7 distractors), "?"
TABLE_SEED = 1234
IOI_S2 = 10  # position of the repeated name in every IOI template


@dataclass(frozen=True)
class TaskBatch:
    """Prompts of one task with their answers at the last position."""

    tokens: Int[Tensor, "batch pos"]  # clean prompts, BOS first, all the same length
    answers: Int[Tensor, " batch"]  # correct next token, predicted at the LAST position
    wrong: Int[Tensor, " batch"]  # a plausible wrong answer (for logit differences)
    corrupted: Int[Tensor, "batch pos"]  # same length; changes the answer (for patching)
    key_positions: Bool[Tensor, "batch pos"]  # ground-truth positions that matter

    def __len__(self) -> int:
        return self.tokens.shape[0]


def vocab(name: str) -> list[str]:
    """The token strings of task `name` (index = token id)."""
    check_name(name)
    return list(VOCAB[name])


def ids(name: str, words: list[str]) -> Tensor:
    index = {w: i for i, w in enumerate(VOCAB[name])}
    return torch.tensor([index[w] for w in words])


def recall_table() -> dict[str, str]:
    """The memorised facts of `recall`: subject -> attribute (fixed, seeded)."""
    g = torch.Generator().manual_seed(TABLE_SEED)
    # every attribute is used by the same number of subjects
    order = torch.randperm(len(RECALL_SUBJECTS), generator=g) % len(RECALL_ATTRIBUTES)
    return {s: RECALL_ATTRIBUTES[a] for s, a in zip(RECALL_SUBJECTS, order.tolist(), strict=True)}


def check_name(name: str) -> None:
    if name not in TASKS:
        raise DepassError(f"unknown task {name!r}; tasks: {sorted(TASKS)}")


def generate(name: str, n: int, seed: int = 0) -> TaskBatch:
    """`n` prompts of task `name` (see `TASKS`); deterministic given `seed`."""
    check_name(name)
    if n < 1:
        raise DepassError(f"generate: need n >= 1 prompts, got {n}")
    g = torch.Generator().manual_seed(seed)
    return {"induction": induction, "recall": recall, "ioi": ioi}[name](n, g)


def randint(high: int, g: torch.Generator) -> int:
    return int(torch.randint(high, (), generator=g))


def induction_sequence(length: int, g: torch.Generator) -> tuple[list[int], int]:
    """BOS, L distinct random symbols, then the first `length` - 1 - L of them again; returns
    the ids (`length` + 1 of them: the last is the next token) and L."""
    first = 2  # symbols start after BOS and PAD
    r = (torch.randperm(len(INDUCTION_SYMBOLS), generator=g)[:length] + first).tolist()
    L = 8 + randint(length - 1 - 8, g)  # 8 <= L <= length - 2: at least one repeated token
    return [0] + r[:L] + r[:length - L], L


def repeat_sequence(length: int, g: torch.Generator, replace: bool = False,
                    repeat: int | None = None, prefix: int = 0, gap: int = 0) -> list[int]:
    """BOS, `prefix` random symbols, s (`length` random symbols), `gap` random symbols, then the
    first `repeat` symbols of s again (None: all of s; `[BOS, s, s]` by default). All the random
    symbols are distinct unless `replace` (then drawn with replacement)."""
    first, n_symbols = 2, len(INDUCTION_SYMBOLS)  # symbols start after BOS and PAD
    repeat, n = length if repeat is None else repeat, prefix + length + gap
    if replace:
        r = torch.randint(n_symbols, (n,), generator=g)
    else:
        if n > n_symbols:
            raise DepassError(f"repeat_sequence: {n} distinct symbols asked for, there are "
                              f"{n_symbols}; use replace=True or a shorter sequence")
        r = torch.randperm(n_symbols, generator=g)[:n]
    r = (r + first).tolist()
    return [0] + r + r[prefix:prefix + repeat]


def induction(n: int, g: torch.Generator) -> TaskBatch:
    tokens, answers, wrong, corrupted = [], [], [], []
    key = torch.zeros(n, INDUCTION_LENGTH, dtype=torch.bool)
    for b in range(n):
        seq, L = induction_sequence(INDUCTION_LENGTH, g)
        prompt, answer = seq[:-1], seq[-1]
        k = INDUCTION_LENGTH - 1 - L  # the last position holds r_k; r_k first came at position k
        unused = sorted(set(range(2, len(VOCAB["induction"]))) - set(seq))
        other = unused[randint(len(unused), g)]
        bad = list(prompt)
        bad[k + 1] = other  # the earlier next token: induction now predicts `other`
        tokens.append(prompt)
        answers.append(answer)
        wrong.append(other)
        corrupted.append(bad)
        key[b, k + 1] = True
    return TaskBatch(torch.tensor(tokens), torch.tensor(answers), torch.tensor(wrong),
                     torch.tensor(corrupted), key)


def recall(n: int, g: torch.Generator) -> TaskBatch:
    table = recall_table()
    v = {w: i for i, w in enumerate(VOCAB["recall"])}
    S, D = len(RECALL_SUBJECTS), len(RECALL_DISTRACTORS)
    tokens, answers, wrong, corrupted = [], [], [], []
    key = torch.zeros(n, RECALL_CONTEXT + 2, dtype=torch.bool)
    for b in range(n):
        subject = RECALL_SUBJECTS[randint(S, g)]
        others = [s for s in RECALL_SUBJECTS if table[s] != table[subject]]
        swap = others[randint(len(others), g)]
        context = [RECALL_DISTRACTORS[i] for i in torch.randint(D, (RECALL_CONTEXT,), generator=g)]
        p = randint(RECALL_CONTEXT, g)
        context[p] = subject
        prompt = [v[BOS]] + [v[w] for w in context] + [v["?"]]
        bad = list(prompt)
        bad[1 + p] = v[swap]
        tokens.append(prompt)
        answers.append(v[table[subject]])
        wrong.append(v[table[swap]])
        corrupted.append(bad)
        key[b, 1 + p] = True
    return TaskBatch(torch.tensor(tokens), torch.tensor(answers), torch.tensor(wrong),
                     torch.tensor(corrupted), key)


def ioi(n: int, g: torch.Generator) -> TaskBatch:
    v = {w: i for i, w in enumerate(VOCAB["ioi"])}
    tokens, answers, wrong, corrupted = [], [], [], []
    key = torch.zeros(n, 15, dtype=torch.bool)
    for b in range(n):
        io, s, third = (NAMES[i] for i in torch.randperm(len(NAMES), generator=g)[:3].tolist())
        template = IOI_TEMPLATES[randint(len(IOI_TEMPLATES), g)]
        first, second = (io, s) if randint(2, g) else (s, io)
        fill = {"A": first, "B": second, "S": s, "PLACE": PLACES[randint(len(PLACES), g)],
                "OBJECT": OBJECTS[randint(len(OBJECTS), g)]}
        words = [BOS] + [fill.get(w, w) for w in template.split()]
        prompt = [v[w] for w in words]
        bad = list(prompt)
        bad[IOI_S2] = v[third]  # the repeated name replaced by a third name
        tokens.append(prompt)
        answers.append(v[io])
        wrong.append(v[s])
        corrupted.append(bad)
        key[b, words.index(io)] = True
    return TaskBatch(torch.tensor(tokens), torch.tensor(answers), torch.tensor(wrong),
                     torch.tensor(corrupted), key)
