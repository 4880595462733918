"""Train `pystdlib`, a small GPT-2-style model of real Python: `python -m tl_depass.models.text`.

The corpus is the running interpreter's standard library (`tl_depass.models.corpus`: sorted file
list, one file in 20 held out). A byte-level BPE tokenizer (`tokenizers`, 4096 tokens, one special
token `<|endoftext|>` that is BOS and file separator) is trained on the training files; the model
on random windows of their token stream, each window starting with BOS (as `model.to_tokens`
prepends it). Deterministic: fixed seeds, one CPU thread, deterministic algorithms, training
windows drawn from seeds 1 000 000 + step. Training stops after STEPS steps or at `--max-minutes`
of wall time, whichever comes first (the JSON records which). Writes `pystdlib.safetensors`
(float16), `pystdlib_tokenizer.json` and `pystdlib.json` (config, tokenizer file, corpus
manifest, training settings, held-out loss beside a unigram baseline, reference logits).
"""

import argparse
import json
import math
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor

from tl_depass import commands
from tl_depass.engine.backends import Model
from tl_depass.models import corpus
from tl_depass.models.train import hooked

HERE = Path(__file__).parent
NAME = "pystdlib"
BOS = "<|endoftext|>"
VOCAB_SIZE = 4096
CONFIG = dict(n_layers=2, d_model=128, n_heads=4, d_head=32, d_mlp=512, act_fn="gelu_new",
              n_ctx=128, normalization_type="LN", positional_embedding_type="standard", seed=0)
STEPS, BATCH, LR, WARMUP = 1200, 16, 3e-3, 100
TRAIN_SEED_OFFSET = 1_000_000
MECHANISM = ("indentation: from a line-ending ':' the layer-1 heads L1H1 and L1H3 (with L0H0) "
             "attend to the newline token that starts the line and predict the next line one "
             "level deeper (zeroing L1H3 and L0H0 makes it pick the wrong depth); an open quote "
             "or bracket is tracked by L0H1, the top head for DePass and patching alike. No "
             "induction heads; `self` in a method comes from context, not from copying the "
             "parameter name (docs/models.md).")


def train_tokenizer(texts: list[str]):
    """A byte-level BPE tokenizer (GPT-2's pre-tokenizer: runs of spaces stay together, so
    indentation is a few tokens) with VOCAB_SIZE tokens; BOS is token 0."""
    os.environ.setdefault("RAYON_NUM_THREADS", "1")  # one thread: the merges do not depend on timing
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=[BOS], min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return tok


def token_stream(tok, texts: list[str]) -> Tensor:
    """All texts' tokens, each text followed by BOS (the file separator)."""
    bos = tok.token_to_id(BOS)
    ids = []
    for enc in tok.encode_batch(texts):
        ids.extend(enc.ids)
        ids.append(bos)
    return torch.tensor(ids, dtype=torch.int64)


def windows(stream: Tensor, starts: Tensor, n_ctx: int, bos: int) -> tuple[Tensor, Tensor]:
    """(tokens, targets), both [batch, n_ctx]: BOS then stream[s : s + n_ctx - 1], and the
    tokens that follow, stream[s : s + n_ctx]."""
    idx = starts[:, None] + torch.arange(n_ctx)
    targets = stream[idx]
    tokens = torch.cat([torch.full((len(starts), 1), bos), targets[:, :-1]], 1)
    return tokens, targets


def held_out_windows(stream: Tensor, n_ctx: int, bos: int) -> tuple[Tensor, Tensor]:
    """The held-out stream cut into consecutive, non-overlapping windows (the evaluation set)."""
    starts = torch.arange(0, len(stream) - n_ctx, n_ctx)
    return windows(stream, starts, n_ctx, bos)


@torch.no_grad()
def mean_loss(model: Model, tokens: Tensor, targets: Tensor, chunk: int = 64) -> Tensor:
    """Cross-entropy (nats/token) at every position, [batch, pos]."""
    out = []
    for i in range(0, len(tokens), chunk):
        logits = model(tokens[i:i + chunk])
        out.append(F.cross_entropy(logits.flatten(0, 1), targets[i:i + chunk].flatten(), reduction="none"
                                   ).view(targets[i:i + chunk].shape))
    return torch.cat(out)


def unigram_loss(train_stream: Tensor, targets: Tensor, vocab: int) -> float:
    """Cross-entropy of the training stream's token frequencies (add-one) on `targets`."""
    counts = torch.bincount(train_stream, minlength=vocab).double() + 1
    return -(counts / counts.sum()).log()[targets].mean().item()


def lr_at(step: int, steps: int) -> float:
    """Linear warm-up, then cosine decay to a tenth."""
    if step < WARMUP:
        return LR * (step + 1) / WARMUP
    return LR * (0.1 + 0.45 * (1 + math.cos(math.pi * (step - WARMUP) / max(1, steps - WARMUP))))


def snapshot(model: Model, config: dict, tok, folder: Path) -> None:
    """The weights so far, loadable with `models.load(folder / "pystdlib.json")` (to look at a
    model while it trains); the final files are written beside `folder`, not in it."""
    folder.mkdir(exist_ok=True)
    tok_file = f"{NAME}_tokenizer.json"
    tok.save(str(folder / tok_file))
    save_file({k: v.detach().to(torch.float16).contiguous() for k, v in model.named_parameters()},
              str(folder / f"{NAME}.safetensors"))
    meta = {"task": "text", "config": config,
            "tokenizer": {"type": "byte_level_bpe", "file": tok_file, "bos": BOS}}
    (folder / f"{NAME}.json").write_text(json.dumps(meta))


def train(out: Path = HERE, steps: int = STEPS, max_minutes: float = 35.0, log_every: int = 250) -> dict:
    start = time.time()
    paths = corpus.files()
    manifest = corpus.manifest(paths)
    train_files, held_files = corpus.split(paths)
    tok = train_tokenizer([corpus.read(p) for p in train_files])
    bos = tok.token_to_id(BOS)
    train_stream = token_stream(tok, [corpus.read(p) for p in train_files])
    held_stream = token_stream(tok, [corpus.read(p) for p in held_files])
    print(f"corpus: {len(train_files)} training files ({len(train_stream)} tokens), "
          f"{len(held_files)} held out ({len(held_stream)} tokens); tokenizer "
          f"{time.time() - start:.0f} s", flush=True)
    config = dict(CONFIG, d_vocab=tok.get_vocab_size())
    torch.manual_seed(config["seed"])
    model = hooked(config)
    n_ctx = config["n_ctx"]
    h_tokens, h_targets = held_out_windows(held_stream, n_ctx, bos)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1, betas=(0.9, 0.95))
    t0, stopped, done = time.time(), "steps", 0
    for step in range(steps):
        if time.time() - t0 > 60 * max_minutes:
            stopped = "wall"
            break
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps)
        g = torch.Generator().manual_seed(TRAIN_SEED_OFFSET + step)
        starts = torch.randint(0, len(train_stream) - n_ctx, (BATCH,), generator=g)
        tokens, targets = windows(train_stream, starts, n_ctx, bos)
        loss = F.cross_entropy(model(tokens).flatten(0, 1), targets.flatten())
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        done = step + 1
        if done % log_every == 0:
            model.eval()
            held = mean_loss(model, h_tokens[:64], h_targets[:64]).mean().item()
            model.train()
            print(f"step {done}: loss {loss.item():.3f}, held-out {held:.3f} "
                  f"({time.time() - t0:.0f} s)", flush=True)
            snapshot(model, config, tok, out / "snapshot")
    wall = time.time() - t0
    model.eval()
    params = {k: v.detach().to(torch.float16).contiguous() for k, v in model.named_parameters()}
    model.load_state_dict({k: v.float() for k, v in params.items()}, strict=False)  # as shipped
    losses = mean_loss(model, h_tokens, h_targets)
    unigram = unigram_loss(train_stream, h_targets, config["d_vocab"])
    reference = h_tokens[:1, :32]
    with torch.no_grad():
        ref_logits = model(reference)[0, -1]
    tok_file = f"{NAME}_tokenizer.json"
    meta = {
        "task": "text",
        "config": config,
        "tokenizer": {"type": "byte_level_bpe", "file": tok_file, "bos": BOS},
        "mechanism": MECHANISM,
        "corpus": manifest,
        "train": {"seed": config["seed"], "steps": done, "planned_steps": steps,
                  "stopped_by": stopped, "batch": BATCH, "lr": LR,
                  "optimizer": f"AdamW(betas=(0.9, 0.95), weight_decay=0.1), {WARMUP}-step "
                               "warm-up, cosine decay to lr / 10, gradient norm clipped at 1",
                  "data_seeds": f"window starts from seeds {TRAIN_SEED_OFFSET} + step",
                  "train_tokens": len(train_stream), "wall_s": round(wall, 1),
                  "threads": torch.get_num_threads()},
        "held_out": {"tokens": int(h_targets.numel()), "windows": len(h_targets),
                     "loss": losses.mean().item(), "loss_last_half": losses[:, n_ctx // 2:].mean().item(),
                     "unigram_loss": unigram, "storage": "float16 weights, computed in float32"},
        "reference": {"tokens": reference[0].tolist(), "last_logits": ref_logits.tolist()},
    }
    tok.save(str(out / tok_file))
    save_file(params, str(out / f"{NAME}.safetensors"))
    with open(out / f"{NAME}.json", "w") as f:
        json.dump(meta, f, indent=1)
    print(f"{NAME}: {done} steps ({stopped}) in {wall:.0f} s; held-out loss "
          f"{meta['held_out']['loss']:.3f} nats/token (unigram {unigram:.3f}); wrote "
          f"{out / NAME}.{{json,safetensors}} and {out / tok_file}", flush=True)
    return meta


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=commands.description(__doc__))
    parser.add_argument("--out", type=Path, default=HERE, help="folder for the model files")
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--max-minutes", type=float, default=35.0,
                        help="stop training after this much wall time (the JSON records it)")
    commands.add_threads(parser, "CPU threads (results are bit-identical only for the same count)")
    args = parser.parse_args(argv)
    with commands.torch_settings(threads=args.threads, deterministic=True):
        train(args.out, args.steps, args.max_minutes)


if __name__ == "__main__":
    commands.run_command("python -m tl_depass.models.text", main)
