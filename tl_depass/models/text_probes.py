"""Contrast prompts for `pystdlib`: pairs of code prompts that differ in one token, each with the
token the model should predict and the token the other prompt calls for.

Each family probes one behaviour of a model of Python source (`families()`):
- `induction`: an identifier `a_b` (two random word tokens) used once, then `a_` again: predict
  `b` (the corrupted prompt used `a_b2`);
- `brackets`: `x = f(a, b` predicts `)` rather than `]` (corrupted: `x = f[a, b`);
- `quotes`: `x = "a b` predicts `"` rather than `'` (corrupted: `x = 'a b`);
- `self`: `def m(self, a):` then `return` predicts ` self` rather than ` cls` (corrupted: `cls`);
- `indent`: after `if c:` on a line indented 4 spaces, the newline token carries 8 spaces of
  indentation, not 12 (corrupted: the `if` line indented 8 spaces).

    pairs = text_probes.make(model, "brackets", 32, seed=0)
    pairs.tokens, pairs.corrupted, pairs.answers, pairs.wrong, pairs.key_positions
"""

import random
import re
from dataclasses import dataclass

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from tl_depass.engine.backends import Model
from tl_depass.errors import DepassError

FAMILIES = ("induction", "brackets", "quotes", "self", "indent")


@dataclass
class Pairs:
    family: str
    tokens: Int[Tensor, "batch pos"]  # BOS first; the answer is the next token after the last
    corrupted: Int[Tensor, "batch pos"]  # the same prompt with the key token changed
    answers: Int[Tensor, " batch"]  # what the clean prompt calls for
    wrong: Int[Tensor, " batch"]  # what the corrupted prompt calls for
    key_positions: Bool[Tensor, "batch pos"]  # where clean and corrupted differ
    texts: list[str]

    def __len__(self) -> int:
        return len(self.answers)


def words(model: Model, space: bool) -> list[str]:
    """Lower-case word tokens (3-8 letters) of the vocabulary, with or without a leading space."""
    pattern = re.compile(r"^ [a-z]{3,8}$" if space else r"^[a-z]{3,8}$")
    vocab = [model.tokenizer.decode([i]) for i in range(model.cfg.d_vocab)]
    return sorted(w for w in vocab if pattern.match(w) and w.strip() not in KEYWORDS)


KEYWORDS = {"and", "not", "for", "def", "class", "return", "self", "cls", "else", "elif", "while",
            "with", "from", "import", "pass", "none", "true", "false", "try", "except", "lambda",
            "yield", "raise", "global", "assert", "async", "await", "finally", "break", "del"}


def template(family: str, r: random.Random, space_words: list[str], bare_words: list[str]
             ) -> tuple[str, str, str, str]:
    """(clean prompt, corrupted prompt, answer text, wrong text) for one draw."""
    w = lambda: r.choice(space_words).strip()  # noqa: E731
    f, a, b, c = w(), w(), w(), w()
    if family == "induction":
        head, tail, other = w(), r.choice(bare_words), r.choice(bare_words)
        body = f"def {f}({a}):\n    {b} = {head}_{{}}({a})\n    if {b}:\n        return {head}_"
        return body.format(tail), body.format(other), tail, other
    if family == "brackets":
        body = f"def {f}({a}, {b}):\n    {c} = {a}{{}}{b}, {a}"
        return body.format("("), body.format("["), ")", "]"
    if family == "quotes":
        body = f"def {f}({a}):\n    {b} = {{}}{c} {a}"
        return body.format('"'), body.format("'"), '"', "'"
    if family == "self":
        body = f"class {f.title()}:\n    def {a}({{}}, {b}):\n        {c} = {b}\n        return"
        return body.format("self"), body.format("cls"), " self", " cls"
    if family == "indent":
        body = (f"def {f}({a}):\n    for {b} in {a}:\n        {c} = {b}\n{{}}if {c}:")
        return body.format(" " * 4), body.format(" " * 8), "\n" + " " * 7, "\n" + " " * 11
    raise DepassError(f"unknown probe family {family!r}; use one of {list(FAMILIES)}")


def single(model: Model, text: str) -> int | None:
    ids = model.tokenizer.encode(text, add_special_tokens=False)
    return ids[0] if len(ids) == 1 else None


def make(model: Model, family: str, n: int, seed: int = 0) -> Pairs:
    """`n` prompt pairs of `family` (deterministic given `seed`), keeping only draws where the
    clean and corrupted prompts tokenize to the same length and differ in exactly one token."""
    if family not in FAMILIES:
        raise DepassError(f"unknown probe family {family!r}; use one of {list(FAMILIES)}")
    r = random.Random(f"{family}-{seed}")
    space_words, bare_words = words(model, True), words(model, False)
    by_length: dict[int, list] = {}  # prompts of one length, so the answer is at the last position
    for _ in range(50 * n):
        clean, corrupt, answer, wrong = template(family, r, space_words, bare_words)
        t, c = model.to_tokens(clean)[0], model.to_tokens(corrupt)[0]
        a, w = single(model, answer), single(model, wrong)
        if a is None or w is None or a == w or t.shape != c.shape or (t != c).sum() != 1:
            continue
        if family == "induction" and model.to_tokens(clean + answer)[0].shape[0] != len(t) + 1:
            continue  # `head_tail` must tokenize as head, _, tail
        rows = by_length.setdefault(len(t), [])
        rows.append((t, c, a, w, clean))
        if len(rows) == n:
            break
    else:
        raise DepassError(f"fewer than {n} {family!r} prompts of one length tokenize as the probe "
                          "needs with this model's tokenizer; ask for fewer")
    tokens = torch.stack([row[0] for row in rows])
    corrupted = torch.stack([row[1] for row in rows])
    return Pairs(family, tokens, corrupted, torch.tensor([row[2] for row in rows]),
                 torch.tensor([row[3] for row in rows]), tokens != corrupted, [row[4] for row in rows])


__all__ = ["FAMILIES", "Pairs", "make"]
