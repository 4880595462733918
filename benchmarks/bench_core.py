"""Core benchmark: decompose time vs one plain forward at batch M, and peak memory vs chunk_size.

    python benchmarks/bench_core.py            # prints a Markdown table

Model: 4 layers, d_model=256, 8 heads, d_mlp=1024, float32, random weights; token level, so
M = N + 1 components (N tokens plus bias; the folded forward also carries one zero probe).
Each memory figure is the peak resident memory of a fresh subprocess minus its baseline.
"""

import multiprocessing as mp
import resource
import time

import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

import tl_depass


def model() -> HookedTransformer:
    cfg = HookedTransformerConfig(n_layers=4, d_model=256, n_heads=8, d_head=32, d_mlp=1024,
                                  d_vocab=1000, n_ctx=256, act_fn="gelu_new",
                                  normalization_type="LN", seed=0)
    return HookedTransformer(cfg).eval()


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def measure(kind: str, n: int, rule: str, chunk: int | None, queue) -> None:
    torch.manual_seed(0)
    m = model()
    tokens = torch.randint(0, 1000, (1, n))
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    repeats = 3 if n <= 64 else 1
    with torch.no_grad():
        if kind == "forward":
            folded = tokens.repeat(n + 1, 1)
            seconds = best_of(lambda: m(folded), repeats)
        else:
            seconds = best_of(lambda: tl_depass.decompose(m, tokens, mlp_rule=rule,
                                                          chunk_size=chunk), repeats)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base
    queue.put((seconds, peak / 1024))


def run(*args) -> tuple[float, float]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    p = ctx.Process(target=measure, args=(*args, queue))
    p.start()
    result = queue.get()
    p.join()
    return result


def main() -> None:
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; best of 3 runs at "
          "N=64, one run at N=256\n")
    print("| N tokens | what | seconds | / forward at batch M | peak MiB |")
    print("|---|---|---|---|---|")
    for n in (64, 256):
        fwd, fwd_mem = run("forward", n, "", None)
        print(f"| {n} | plain forward, batch M={n + 1} | {fwd:.3f} | 1.00 | {fwd_mem:.0f} |", flush=True)
        for rule, chunk in [("softmax", None), ("ratio", None), ("softmax", n // 4),
                            ("ratio", n // 4)]:
            sec, mem = run("decompose", n, rule, chunk)
            what = f"decompose {rule}" + (f", chunk_size={chunk}" if chunk else "")
            print(f"| {n} | {what} | {sec:.3f} | {sec / fwd:.2f} | {mem:.0f} |", flush=True)


if __name__ == "__main__":
    main()
