"""Train the bundled models: `python -m tl_depass.models.train [--name induction|recall|ioi|all]`.

Deterministic (fixed seeds, one CPU thread, deterministic algorithms); writes
`tl_depass/models/<name>.safetensors` (parameters of the HookedTransformer, float32) and
`<name>.json` (config fields, vocabulary, task, training settings, held-out accuracy, for
`induction` its held-out accuracy on repeats of every length (`induction_generalisation`), and
reference logits that the bridge backend is checked against).
"""

import argparse
import json
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor

from tl_depass import commands
from tl_depass.engine.backends import Model
from tl_depass.models import tasks

HERE = Path(__file__).parent
TRAIN_SEED_OFFSET = 1_000_000  # training batches use tasks seeds 1_000_000 + step
HELD_OUT_SEED = 1  # the reported accuracy; the tests use seed 0; both differ from training
EVAL_SEED = 2_000_000  # induction_generalisation: seeds 2_000_000 + 100 L + 6..11, not training's

COMMON = dict(d_model=64, n_heads=4, d_head=16, normalization_type="LN",
              positional_embedding_type="standard", seed=0)
SPECS = {
    "induction": dict(
        config=dict(COMMON, n_layers=2, n_ctx=32, attn_only=True, act_fn="relu", d_mlp=None),
        steps=4000, batch=64, lr=1e-3,
        mechanism="L0H0 is a previous-token head (it writes each token's predecessor into its "
                  "residual stream, at every position); all four layer-1 heads are induction "
                  "heads: from the current token they attend to the token after its earlier "
                  "occurrence (K-composition with L0H0) and copy it; L0H1 and L0H2 attend to the "
                  "token itself and add its identity, which the induction heads read "
                  "(V-composition); L0H3 does little."),
    "recall": dict(
        config=dict(COMMON, n_layers=2, n_ctx=16, d_mlp=256, act_fn="relu"),
        steps=3000, batch=64, lr=1e-3,
        mechanism="layer-0 heads (L0H0, L0H2) attend from '?' to the subject and move it there; "
                  "layer-0 MLP neurons at '?' map the subject to its attribute (32 memorised "
                  "facts, 8 attributes), spread over many neurons; layer 1 adds confidence but is "
                  "not needed for the answer."),
    "ioi": dict(
        config=dict(COMMON, n_layers=2, n_ctx=16, d_mlp=128, act_fn="relu"),
        steps=3000, batch=64, lr=1e-3,
        mechanism="L1H0 (with L1H1) attends from the last position to the repeated name S2 "
                  "(position 10 in every template) and copies out the other name: at S2, layer-0 "
                  "heads gather the two earlier names and the layer-0 MLP works on them; layer-0 "
                  "heads at the last position also read the two earlier names directly. The "
                  "indirect object's token is the top input position, and L1H0 the top head for "
                  "DePass and for activation patching alike."),
}


def induction_row(n_ctx: int, g: torch.Generator) -> tuple[list[int], list[bool]]:
    """One training sequence for `induction` (at most `n_ctx` + 1 ids: the last is only a target)
    and its loss mask over the inputs: True where the next token is a copy that induction
    determines (the 2nd and later tokens of a repeat). Formats: the task's own (1 in 5); else
    `[BOS, prefix, s, gap, s[:k]]` with |s| in 1..(n_ctx - 1) // 2, k = |s| half the time,
    prefix and gap empty a third of the time (else random lengths that fit), symbols distinct
    (5 in 8) or drawn with replacement (3 in 8)."""
    u = tasks.randint(10, g)
    if u < 2:
        seq, L = tasks.induction_sequence(tasks.INDUCTION_LENGTH, g)
        return seq, [i > L for i in range(len(seq) - 1)]
    L = 1 + tasks.randint((n_ctx - 1) // 2, g)
    k = L if tasks.randint(2, g) else 1 + tasks.randint(L, g)
    room = n_ctx - L - k  # BOS + prefix + L + gap + k <= n_ctx + 1
    extra = 0 if tasks.randint(3, g) == 0 else tasks.randint(room + 1, g)
    gap = tasks.randint(extra + 1, g) if tasks.randint(2, g) else 0
    seq = tasks.repeat_sequence(L, g, replace=u >= 7, repeat=k, prefix=extra - gap, gap=gap)
    start = 1 + extra + L  # the first repeated token; it cannot be predicted
    return seq, [start < i + 1 < start + k for i in range(len(seq) - 1)]


def training_batch(name: str, n: int, seed: int, n_ctx: int = 32) -> tuple[Tensor, Tensor, Tensor]:
    """(tokens, next-token targets, loss mask), all [batch, pos]."""
    if name == "induction":  # sequences of many lengths, padded at the end (causal: harmless)
        g = torch.Generator().manual_seed(seed)
        rows = [induction_row(n_ctx, g) for _ in range(n)]
        width = max(len(seq) for seq, _ in rows)
        seqs = torch.full((n, width), tasks.VOCAB[name].index(tasks.PAD))
        mask = torch.zeros(n, width - 1, dtype=torch.bool)
        for b, (seq, m) in enumerate(rows):
            seqs[b, :len(seq)] = torch.tensor(seq)
            mask[b, :len(m)] = torch.tensor(m)
        return seqs[:, :-1], seqs[:, 1:], mask
    batch = tasks.generate(name, n, seed)
    targets = torch.zeros_like(batch.tokens)
    targets[:, -1] = batch.answers
    mask = torch.zeros_like(batch.tokens, dtype=torch.bool)
    mask[:, -1] = True
    return batch.tokens, targets, mask


def one_token_ceiling(tokens: Tensor, pos: int) -> float:
    """The best a one-token induction rule can do at `pos` (predicting tokens[pos + 1]): it sees
    the current token and the tokens that followed its earlier occurrences; if k different tokens
    did, it cannot know which is meant (1/k), and 0 if the answer is not among them."""
    seq = tokens.tolist()
    followers = {seq[q + 1] for q in range(pos) if seq[q] == seq[pos]}
    return 1 / len(followers) if seq[pos + 1] in followers else 0.0


@torch.no_grad()
def induction_generalisation(model: Model, n: int = 200, seed: int = EVAL_SEED) -> dict:
    """Next-token accuracy on held-out repeats, for every |s| = L from 3 to (n_ctx - 1) // 2, at
    the 2nd..L-th tokens of the repeat (where induction determines the answer):
    `distinct`: `[BOS, s, s]`, s of L distinct symbols; `at_end`: the same after a random prefix
    that fills the context (the first s ends late); `replacement`: `[BOS, s, s]` with s drawn
    with replacement, beside `one_token_ceiling` (see `one_token_ceiling`) and the accuracy
    where that ceiling is 1 (`unambiguous`: the current token's earlier occurrences were all
    followed by the same token)."""
    out = {}
    for L in range(3, (model.cfg.n_ctx - 1) // 2 + 1):
        row = {}
        for form in ("distinct", "at_end", "replacement"):
            g = torch.Generator().manual_seed(seed + 100 * L + len(form))
            prefix = model.cfg.n_ctx - 1 - 2 * L if form == "at_end" else 0
            tokens = torch.tensor([tasks.repeat_sequence(L, g, form == "replacement", prefix=prefix)
                                   for _ in range(n)])
            start = 1 + prefix + L
            right = model(tokens)[:, start:start + L - 1].argmax(-1) == tokens[:, start + 1:]
            row[form] = right.float().mean().item()
        # `tokens` and `right` are now those of the last format, drawn with replacement
        ceiling = torch.tensor([[one_token_ceiling(t, p) for p in range(L + 1, 2 * L)]
                                for t in tokens])
        row["one_token_ceiling"] = ceiling.mean().item()
        row["unambiguous"] = right[ceiling == 1].float().mean().item()
        out[L] = row
    return out


def print_generalisation(table: dict) -> None:
    print("  L  distinct  at the end  with replacement  one-token ceiling  where unambiguous")
    for L, r in table.items():
        print(f"{L:>3}  {r['distinct']:8.3f}  {r['at_end']:10.3f}  {r['replacement']:16.3f}  "
              f"{r['one_token_ceiling']:17.3f}  {r['unambiguous']:17.3f}", flush=True)


@torch.no_grad()
def accuracy(model: Model, name: str, n: int, seed: int) -> float:
    batch = tasks.generate(name, n, seed)
    return (model(batch.tokens)[:, -1].argmax(-1) == batch.answers).float().mean().item()


def hooked(cfg: dict) -> Model:
    """A fresh HookedTransformer of config `cfg` (what the bundled models are trained as)."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    with warnings.catch_warnings():  # TL 3.x announces HookedTransformer's removal in 4.0
        warnings.filterwarnings("ignore", "HookedTransformer is deprecated", DeprecationWarning)
        return HookedTransformer(HookedTransformerConfig(**cfg))


def build(name: str) -> tuple[Model, dict]:
    cfg = dict(SPECS[name]["config"], d_vocab=len(tasks.VOCAB[name]))
    return hooked(cfg), cfg


def train(name: str, out: Path = HERE, log_every: int = 500) -> dict:
    spec = SPECS[name]
    torch.manual_seed(spec["config"]["seed"])
    model, cfg = build(name)
    opt = torch.optim.AdamW(model.parameters(), lr=spec["lr"], weight_decay=0.01)
    start = time.time()
    for step in range(spec["steps"]):
        lr = spec["lr"] * min(1.0, (step + 1) / 100)  # short warm-up
        for group in opt.param_groups:
            group["lr"] = lr
        tokens, targets, mask = training_batch(name, spec["batch"], TRAIN_SEED_OFFSET + step,
                                               cfg["n_ctx"])
        logits = model(tokens)
        loss = F.cross_entropy(logits[mask], targets[mask])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if (step + 1) % log_every == 0:
            acc = accuracy(model, name, 256, HELD_OUT_SEED)
            print(f"{name} step {step + 1}: loss {loss.item():.4f}, held-out accuracy {acc:.3f}",
                  flush=True)
    wall = time.time() - start
    model.eval()
    n = 2000
    acc = accuracy(model, name, n, HELD_OUT_SEED)
    reference = tasks.generate(name, 1, seed=0).tokens
    with torch.no_grad():
        ref_logits = model(reference)[0, -1]
    meta = {
        "task": name,
        "config": {k: v for k, v in cfg.items() if v is not None},
        "vocab": tasks.VOCAB[name],
        "mechanism": spec["mechanism"],
        "train": {"seed": cfg["seed"], "steps": spec["steps"], "batch": spec["batch"],
                  "lr": spec["lr"], "optimizer": "AdamW(weight_decay=0.01), 100-step warm-up",
                  "data_seeds": f"tasks seeds {TRAIN_SEED_OFFSET}..{TRAIN_SEED_OFFSET + spec['steps'] - 1}",
                  "wall_s": round(wall, 1), "threads": torch.get_num_threads()},
        "accuracy": {"held_out": acc, "n": n, "seed": HELD_OUT_SEED},
        "reference": {"tokens": reference[0].tolist(), "last_logits": ref_logits.tolist()},
    }
    if name == "induction":
        meta["generalisation"] = induction_generalisation(model)
        print_generalisation(meta["generalisation"])
    params = {k: v.detach().to(torch.float32).contiguous() for k, v in model.named_parameters()}
    save_file(params, str(out / f"{name}.safetensors"))
    with open(out / f"{name}.json", "w") as f:
        json.dump(meta, f, indent=1)
    print(f"{name}: held-out accuracy {acc:.4f} on {n} prompts, trained in {wall:.0f} s; "
          f"wrote {out / name}.{{json,safetensors}}", flush=True)
    return meta


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=commands.description(__doc__))
    parser.add_argument("--name", default="all", choices=[*SPECS, "all"])
    parser.add_argument("--out", type=Path, default=HERE, help="folder for the .json/.safetensors")
    commands.add_threads(parser, "CPU threads (results are bit-identical only for the same count)")
    args = parser.parse_args(argv)
    with commands.torch_settings(threads=args.threads, deterministic=True):
        for name in SPECS if args.name == "all" else [args.name]:
            train(name, args.out)


if __name__ == "__main__":
    commands.run_command("python -m tl_depass.models.train", main)
