"""Train the bundled models: `python -m tl_depass.models.train [--name induction|recall|ioi|all]`.

Deterministic (fixed seeds, one CPU thread, deterministic algorithms); writes
`tl_depass/models/<name>.safetensors` (parameters of the HookedTransformer, float32) and
`<name>.json` (config fields, vocabulary, task, training settings, held-out accuracy, and
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

COMMON = dict(d_model=64, n_heads=4, d_head=16, normalization_type="LN",
              positional_embedding_type="standard", seed=0)
SPECS = {
    "induction": dict(
        config=dict(COMMON, n_layers=2, n_ctx=32, attn_only=True, act_fn="relu", d_mlp=None),
        steps=3000, batch=64, lr=1e-3,
        mechanism="L0H0 is a previous-token head (it writes each token's predecessor into its "
                  "residual stream); all four layer-1 heads are induction heads: from the current "
                  "token they attend to the token after its earlier occurrence (K-composition with "
                  "L0H0) and copy it; L0H1-3 add each token's own identity, which the induction "
                  "heads read (V-composition)."),
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


def training_batch(name: str, n: int, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    """(tokens, next-token targets, loss mask), all [batch, pos]."""
    if name == "induction":  # the loss at every repeated position, not only the last one
        g = torch.Generator().manual_seed(seed)
        rows, mask = [], torch.zeros(n, tasks.INDUCTION_LENGTH, dtype=torch.bool)
        for b in range(n):
            seq, L = tasks.induction_sequence(tasks.INDUCTION_LENGTH, g)
            rows.append(seq)
            mask[b, L + 1:] = True
        seqs = torch.tensor(rows)
        return seqs[:, :-1], seqs[:, 1:], mask
    batch = tasks.generate(name, n, seed)
    targets = torch.zeros_like(batch.tokens)
    targets[:, -1] = batch.answers
    mask = torch.zeros_like(batch.tokens, dtype=torch.bool)
    mask[:, -1] = True
    return batch.tokens, targets, mask


@torch.no_grad()
def accuracy(model: Model, name: str, n: int, seed: int) -> float:
    batch = tasks.generate(name, n, seed)
    return (model(batch.tokens)[:, -1].argmax(-1) == batch.answers).float().mean().item()


def build(name: str) -> tuple[Model, dict]:
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = dict(SPECS[name]["config"], d_vocab=len(tasks.VOCAB[name]))
    with warnings.catch_warnings():  # TL 3.x announces HookedTransformer's removal in 4.0
        warnings.filterwarnings("ignore", "HookedTransformer is deprecated", DeprecationWarning)
        return HookedTransformer(HookedTransformerConfig(**cfg)), cfg


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
        tokens, targets, mask = training_batch(name, spec["batch"], TRAIN_SEED_OFFSET + step)
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
