"""Core benchmark: the decomposed forward against what it replaces (issue 15's speed rows).

    python benchmarks/bench_core.py                 # small settings, CPU, 1 thread
    python benchmarks/bench_core.py --n 64 --rounds 5 --layers 6

Three tables, each a ratio measured side by side in one process, interleaved rounds, the minimum
over rounds (CPU: process time, `torch.set_num_threads(1)`; CUDA: wall time after a synchronize):

- token level (softmax and ratio rules, `logits="last"`) vs one plain forward at batch M
  (M = N + 1 components: N tokens and the bias);
- every head of every layer (softmax, forward mode) vs `transformer_lens.patching` of every head
  (`get_act_patch_attn_head_out_all_pos`, one forward per head);
- every neuron of layer L/2 (softmax) vs zero-ablating each neuron (batched full forwards).

Random HookedTransformer (gelu_new, LayerNorm), float32. `benchmarks/gpu.py` runs the same on CUDA.
"""

import argparse
import time

import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig, patching

import tl_depass
from tl_depass.levels.units import Heads, Neurons


def make_model(layers: int, d_model: int, d_vocab: int, n_ctx: int, device: str) -> HookedTransformer:
    cfg = HookedTransformerConfig(n_layers=layers, d_model=d_model, n_heads=d_model // 32, d_head=32,
                                  d_mlp=4 * d_model, d_vocab=d_vocab, n_ctx=n_ctx, act_fn="gelu_new",
                                  normalization_type="LN", seed=0, device=device)
    return HookedTransformer(cfg).eval()


def clock(device: str):
    if device.startswith("cuda"):
        def now() -> float:
            torch.cuda.synchronize()
            return time.perf_counter()
        return now
    return time.process_time


def interleaved(cases: dict, rounds: int, device: str) -> dict[str, float]:
    """The minimum time of each case over `rounds` rounds, the cases interleaved in each round."""
    now, best = clock(device), dict.fromkeys(cases, float("inf"))
    for case in cases.values():  # warm-up
        case()
    for _ in range(rounds):
        for name, case in cases.items():
            start = now()
            case()
            best[name] = min(best[name], now() - start)
    return best


def ablate_neurons(model: HookedTransformer, tokens: torch.Tensor, layer: int, batch: int) -> None:
    d_mlp = model.cfg.d_mlp
    for lo in range(0, d_mlp, batch):
        ids = torch.arange(lo, min(lo + batch, d_mlp), device=tokens.device)

        def zero(post, hook, ids=ids):
            post = post.clone()
            post[torch.arange(len(ids), device=post.device), :, ids] = 0
            return post
        model.run_with_hooks(tokens.repeat(len(ids), 1),
                             fwd_hooks=[(f"blocks.{layer}.mlp.hook_post", zero)])


def tables(args) -> list[tuple[str, str, float]]:
    torch.manual_seed(0)
    dev, rows = args.device, []
    model = make_model(args.layers, args.d_model, args.d_vocab, max(args.n, 8), dev)
    tokens = torch.randint(0, args.d_vocab, (1, args.n), device=dev)
    other = torch.randint(0, args.d_vocab, (1, args.n), device=dev)
    with torch.no_grad():
        t = interleaved({
            "forward": lambda: model(tokens.repeat(args.n + 1, 1)),
            "softmax": lambda: tl_depass.decompose(model, tokens, mlp_rule="softmax", logits="last"),
            "ratio": lambda: tl_depass.decompose(model, tokens, mlp_rule="ratio", logits="last"),
        }, args.rounds, dev)
        rows += [("token level, softmax", "one plain forward at batch M", t["softmax"] / t["forward"]),
                 ("token level, ratio", "one plain forward at batch M", t["ratio"] / t["forward"])]
        _, cache = model.run_with_cache(tokens)
        answer = int(model(tokens)[0, -1].argmax())

        def metric(logits):
            return logits[0, -1, answer]
        t = interleaved({
            "patch": lambda: patching.get_act_patch_attn_head_out_all_pos(model, other, cache, metric),
            "depass": lambda: tl_depass.decompose(model, tokens, Heads(), logits="last"),
        }, args.rounds, dev)
        rows.append(("all heads, softmax", "TL patching of every head", t["depass"] / t["patch"]))
        layer = args.layers // 2
        t = interleaved({
            "ablate": lambda: ablate_neurons(model, tokens, layer, args.ablate_batch),
            "depass": lambda: tl_depass.decompose(model, tokens, Neurons(layer), logits="last"),
        }, args.rounds, dev)
        rows.append((f"neurons of layer {layer}, softmax", "zero-ablating each (batched)",
                     t["depass"] / t["ablate"]))
    return rows


def parser(device: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default=device)
    p.add_argument("--n", type=int, default=32, help="tokens")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--d-vocab", type=int, default=1000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--ablate-batch", type=int, default=256, help="neurons per ablation forward")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (torch.set_num_threads)")
    return p


def main(device: str = "cpu") -> None:
    args = parser(device).parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, device {args.device}, {torch.get_num_threads()} thread(s); "
          f"{args.layers} layers, d_model {args.d_model}, d_vocab {args.d_vocab}, N = {args.n}; "
          f"min over {args.rounds} interleaved rounds\n")
    print("| what | vs | ratio (DePass time / baseline time) |")
    print("|---|---|---|")
    for what, vs, ratio in tables(args):
        print(f"| {what} | {vs} | {ratio:.2f} |", flush=True)


if __name__ == "__main__":
    main()
