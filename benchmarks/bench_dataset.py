"""Dataset runs: prompts per second of `tl_depass.run_dataset`, 1 process vs 2 torchrun ranks,
forward engine (softmax) vs backward path (ratio).

    python benchmarks/bench_dataset.py [--prompts 64] [--length 16] [--level heads]
    python benchmarks/bench_dataset.py --smoke        # a few prompts on ioi: checks it runs

Models: the bundled `ioi` (float32) and a GPT-2-small-shaped random model (12 layers, d_model
768, 12 heads, d_mlp 3072, d_vocab 50257, float32, seeded: every rank builds the same one).
Prompts are random token ids of one length (so the batches are full). Each configuration runs in
fresh processes (`python -m torch.distributed.run --standalone --nproc_per_node K` for K ranks,
one thread each), into a fresh directory; the time is rank 0's wall time of `run_dataset`
(model loading and process start-up excluded), the minimum over `--rounds`. On a shared machine
2 ranks only pay off when 2 cores are free.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
GPT2_SMALL = dict(n_layers=12, d_model=768, n_heads=12, d_head=64, d_mlp=3072, d_vocab=50257,
                  n_ctx=1024, act_fn="gelu_new", normalization_type="LN")


def model_named(name: str):
    import tl_depass

    if name == "ioi":
        return tl_depass.models.load("ioi")
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    torch.manual_seed(0)
    return HookedTransformer(HookedTransformerConfig(**GPT2_SMALL, seed=0)).eval()


def worker(args) -> None:
    """One rank: build the model, time run_dataset, print the time as JSON from rank 0."""
    import tl_depass
    from tl_depass.dataset import distributed

    torch.set_num_threads(1)
    model = model_named(args.model)
    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(1, model.cfg.d_vocab, (args.prompts, args.length), generator=g)
    answers = torch.randint(1, model.cfg.d_vocab, (args.prompts,), generator=g)
    level = {"tokens": "tokens", "heads": tl_depass.Heads(), "modules": tl_depass.Modules(),
             "neurons": tl_depass.Neurons(model.cfg.n_layers - 1)}[args.level]
    ranks = distributed.start()  # kept open across run_dataset, so the timing excludes start-up
    try:
        distributed.together(ranks, lambda: None)
        start = time.perf_counter()
        tl_depass.run_dataset(model, list(prompts), level, answers=answers, mlp_rule=args.rule,
                              batch_size=args.batch_size, out=args.out, progress=False)
        seconds = time.perf_counter() - start
    finally:
        distributed.stop(ranks)
    if ranks.rank == 0:
        print(json.dumps({"seconds": seconds}))


def measure(model: str, procs: int, rule: str, args) -> float:
    best = float("inf")
    for _ in range(args.rounds):
        with tempfile.TemporaryDirectory() as out:
            head = [sys.executable] + (["-m", "torch.distributed.run", "--standalone",
                                        "--nproc_per_node", str(procs)] if procs > 1 else [])
            cmd = head + [__file__, "--worker", "--model", model, "--rule", rule, "--out", out,
                          "--prompts", str(args.prompts), "--length", str(args.length),
                          "--level", args.level, "--batch-size", str(args.batch_size)]
            env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
            line = [x for x in done.stdout.splitlines() if x.startswith("{")][-1]
            best = min(best, json.loads(line)["seconds"])
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", default=None, help="ioi or gpt2-shape (default: both)")
    p.add_argument("--rule", default=None)
    p.add_argument("--out", default=None)
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--length", type=int, default=16)
    p.add_argument("--level", default="heads", choices=("tokens", "heads", "modules", "neurons"))
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--smoke", action="store_true", help="4 prompts on ioi, 1 process, one round")
    args = p.parse_args()
    if args.worker:
        return worker(args)
    models = [args.model] if args.model else ["ioi", "gpt2-shape"]
    procs = (1, 2)
    if args.smoke:
        models, procs, args.prompts, args.length, args.rounds = ["ioi"], (1,), 4, 8, 1
    print(f"{args.prompts} prompts of {args.length} tokens, level {args.level}, batch "
          f"{args.batch_size}; prompts per second (rank 0 wall time, min of {args.rounds}); "
          f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}, "
          f"{os.cpu_count()} cores")
    print(f"{'model':<12}{'path':<22}" + "".join(f"{f'{k} proc':>10}" for k in procs))
    for model in models:
        for rule, path in (("softmax", "forward (softmax)"), ("ratio", "backward (ratio)")):
            rates = [args.prompts / measure(model, k, rule, args) for k in procs]
            print(f"{model:<12}{path:<22}" + "".join(f"{r:>10.2f}" for r in rates), flush=True)
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
