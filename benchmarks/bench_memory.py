"""Memory benchmark: `estimate_memory` against the measured peak, and how fast a call that cannot
fit is refused.

    python benchmarks/bench_memory.py           # ~8 min and ~7 GB of RAM on 2 cores
    python benchmarks/bench_memory.py --quick   # N = 64 only
    python benchmarks/bench_memory.py --case defaults --save a.pt   # one N = 512 row (fresh process)
    python benchmarks/bench_memory.py --compare a.pt b.pt           # two rows' logit shares

1. A random 4-layer model (d_model 256, d_mlp 1024, 8 heads) with GPT-2's vocabulary (50257):
   decompose at the token level (softmax, keep=[]) at N = 64 and 128, the estimate against the
   peak resident memory of the call (bench_attribution.PeakMemory: VmHWM above the level before
   the call); then with `max_memory` at half the unchunked estimate, the chunk size decompose
   chooses and the peak it reaches (with the linear rule, which chunks for free; chunked softmax
   runs a statistics sweep per MLP layer and takes minutes).
2. N = 512 (not with --quick): the defaults and `keep=[], chunk_size=32`, peak and logit shares.
3. The GPT-2-small shape (12 layers, d_model 768, 50257 words) at N = 1024 with the logits of
   every position (`logits="all"`): the seconds from the call to the DepassError (the estimate is checked
   before the clean run, so nothing large is allocated).

Results: docs/benchmarks.md ("Memory").
"""

import argparse
import datetime
import os
import platform
import sys
import time

import torch

import tl_depass

sys.path.insert(0, os.path.dirname(__file__))
from bench_attribution import PeakMemory  # noqa: E402

VOCAB = 50257
GiB = 2**30


def random_model(n_layers: int, d_model: int, n_heads: int, n_ctx: int):
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(n_layers=n_layers, d_model=d_model, n_heads=n_heads,
                                  d_head=d_model // n_heads, d_mlp=4 * d_model, d_vocab=VOCAB,
                                  n_ctx=n_ctx, act_fn="gelu_new", normalization_type="LN", seed=0)
    model = HookedTransformer(cfg).eval()
    with torch.no_grad():  # biases and norm weights random too (TL starts them at 0 and 1)
        for name, p in model.named_parameters():
            if name.endswith(("b_Q", "b_K", "b_V", "b_O", "b_in", "b_out", "b_U", ".b")):
                p.normal_(0, 0.02)
            elif name.endswith(".w"):
                p.normal_(1, 0.1)
    return model


def tokens(n: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (1, n), generator=torch.Generator().manual_seed(n))


def measured(model, toks, **options) -> tuple[float, float]:
    """(peak GiB above the level before the call, seconds)."""
    with PeakMemory() as mem:
        start = time.perf_counter()
        dec = tl_depass.decompose(model, toks, keep=[], **options)
        seconds = time.perf_counter() - start
        del dec
    return mem.mib / 1024, seconds


def small(sizes: list[int]) -> list[str]:
    model = random_model(4, 256, 8, 256)
    tl_depass.decompose(model, tokens(8), keep=[])  # one-time costs
    rows = ["| N | estimate | measured peak | estimate / measured | seconds | note |",
            "|---|---|---|---|---|---|"]
    for n in sizes:
        toks = tokens(n)
        est = tl_depass.estimate_memory(model, toks, keep=[], max_memory=2**62)
        peak, seconds = measured(model, toks, max_memory=2**62)
        rows.append(f"| {n} | {est.total / GiB:.2f} GiB | {peak:.2f} GiB | {est.total / GiB / peak:.2f} "
                    f"| {seconds:.1f} | one forward |")
        print(rows[-1], flush=True)
        budget = est.total // 2
        chunked = tl_depass.estimate_memory(model, toks, keep=[], max_memory=budget)
        peak, seconds = measured(model, toks, max_memory=budget, mlp_rule="ratio")
        rows.append(f"| {n} | {chunked.total / GiB:.2f} GiB | {peak:.2f} GiB | "
                    f"{chunked.total / GiB / peak:.2f} | {seconds:.1f} | max_memory={budget / GiB:.2f} "
                    f"GiB: chunk_size={chunked.chunk_size} chosen (ratio rule) |")
        print(rows[-1], flush=True)
    return rows


LONG_CASES = {"defaults": {}, "keep=[], chunk_size=32": dict(keep=[], chunk_size=32),
              "max_memory=2**62 (one forward)": dict(max_memory=2**62)}


def long_case(name: str, n: int = 512, save: str | None = None) -> str:
    """One of issue 15's N = 512 rows (`LONG_CASES`), for a fresh process per case: its table
    row (wall and process seconds: the machine is shared); the logit shares saved to `save`
    (torch.save) to compare runs."""
    model = random_model(4, 256, 8, n)
    toks = tokens(n)
    options = LONG_CASES[name]
    est = tl_depass.estimate_memory(model, toks, **options)
    with PeakMemory() as mem:
        start, cpu = time.perf_counter(), time.process_time()
        dec = tl_depass.decompose(model, toks, **options)
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    if save:
        torch.save(dec.logits, save)
    return (f"| {n} | {name} (chunk {est.chunk_size}) | {est.total / GiB:.2f} GiB | "
            f"{mem.mib / 1024:.2f} GiB | {seconds:.0f} | {cpu:.0f} |")


def long_prompt(n: int = 512) -> list[str]:
    """Issue 15's row: N = 512, GPT-2's vocabulary, the defaults (softmax, the residual stream
    kept, logits at the last token) and keep=[], chunk_size=32; the two runs' logit shares."""
    model = random_model(4, 256, 8, n)
    toks = tokens(n)
    rows = ["| N | options | estimate | measured peak | seconds |", "|---|---|---|---|---|"]
    out = {}
    for name, options in (("defaults", {}), ("keep=[], chunk_size=32", dict(keep=[], chunk_size=32))):
        est = tl_depass.estimate_memory(model, toks, **options)
        with PeakMemory() as mem:
            start = time.perf_counter()
            out[name] = tl_depass.decompose(model, toks, **options).logits
            seconds = time.perf_counter() - start
        rows.append(f"| {n} | {name} (chunk {est.chunk_size}) | {est.total / GiB:.2f} GiB | "
                    f"{mem.mib / 1024:.2f} GiB | {seconds:.0f} |")
        print(rows[-1], flush=True)
    a, b = out.values()
    rows.append(f"\nlogit shares of the two runs: max |difference| {(a - b).abs().max().item():.2e}, "
                f"max |share| {a.abs().max().item():.2e}")
    return rows


def gpt2_small_refused(n: int = 1024) -> list[str]:
    model = random_model(12, 768, 12, 1024)
    toks = tokens(n)
    start = time.perf_counter()
    try:
        tl_depass.decompose(model, toks, logits="all")
        outcome = "ran (no error)"
    except tl_depass.DepassError as e:
        outcome = str(e)
    seconds = time.perf_counter() - start
    print(f"GPT-2-small shape, N = {n}: {seconds:.2f} s to: {outcome}", flush=True)
    return [f"GPT-2-small shape (12 layers, 768, {VOCAB}), N = {n}, default keep, logits='all': "
            f"refused after {seconds:.2f} s with\n\n> {outcome}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="N = 64 only")
    parser.add_argument("--case", choices=sorted(LONG_CASES),
                        help="only this N = 512 row (run each in a fresh process)")
    parser.add_argument("--n", type=int, default=512, help="positions for --case")
    parser.add_argument("--save", help="with --case: torch.save the logit shares here")
    parser.add_argument("--compare", nargs=2, metavar="FILE",
                        help="max |difference| and max |share| of two --save files")
    args = parser.parse_args()
    torch.set_num_threads(2)
    if args.compare:
        a, b = (torch.load(f) for f in args.compare)
        print(f"max |difference| {(a - b).abs().max().item():.2e}, "
              f"max |share| {a.abs().max().item():.2e}")
        return
    if args.case:
        print(long_case(args.case, args.n, args.save), flush=True)
        return
    start = time.perf_counter()
    table = small([64] if args.quick else [64, 128])
    table += [""] + ([] if args.quick else long_prompt())
    refused = gpt2_small_refused()
    now = datetime.datetime.now(datetime.timezone.utc)
    print(f"\n{now:%Y-%m-%d %H:%M} UTC, {platform.machine()}, {os.cpu_count()} CPUs, torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads, total "
          f"{time.perf_counter() - start:.0f} s\n")
    print("4 layers, d_model 256, d_vocab 50257, float32, tokens, softmax, keep=[]:\n")
    print("\n".join(table) + "\n")
    print("\n".join(refused))


if __name__ == "__main__":
    main()
