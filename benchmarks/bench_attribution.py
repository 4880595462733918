"""Attribution benchmark: DePass against the alternatives, side by side in one run, as ratios.

    python benchmarks/bench_attribution.py           # bundled models + random GPT-2-shaped model
                                                     # at 64 and 256 tokens (20-30 min on 2 cores)
    python benchmarks/bench_attribution.py --quick   # bundled models + 64 tokens only (~16 min)
    python benchmarks/bench_attribution.py --only ioi  # the models whose name contains "ioi"

Results and discussion: docs/benchmarks.md (timings on a shared machine are noisy).

For every model size it times (best of `repeats`, wall seconds) and measures peak memory of:
1. token level: decompose (softmax) and attribute (ratio, backward) vs leave-one-token-out
   occlusion and Integrated Gradients (100 steps);
2. all heads: decompose Heads() and attribute Heads() (ratio, backward) vs activation patching
   (zero-ablation) of every head;
3. all neurons of one layer: decompose Neurons(layer) and attribute (backward) vs ablating each
   neuron;
4. decompose vs one plain forward at batch M (M = components + 1);
5. peak memory vs chunk_size, with the chunked logits checked against the unchunked ones.
Where a row says "extrapolated", a subset (of positions, IG steps, heads or neurons) was timed
and the time scaled linearly to the whole; memory is then the subset's.

Memory: the peak resident set size during the call above its level just before it, from the
kernel's high-water mark (VmHWM, reset before each call; free heap memory is returned to the
system first, so earlier calls do not hide this one's allocations). Linux only.
"""

import argparse
import ctypes
import datetime
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

import tl_depass
from tl_depass.evaluate import baselines
from tl_depass.levels import Heads, Neurons, Split

LIBC = ctypes.CDLL("libc.so.6")


def status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


class PeakMemory:
    """Peak resident memory above the level at entry, from the kernel's high-water mark: free
    heap memory is first returned to the system (malloc_trim), then VmHWM is reset to the current
    resident size (writing 5 to /proc/self/clear_refs, Linux >= 4.0) and read after the call."""

    def __enter__(self):
        LIBC.malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        self.base = status_kib("VmRSS")
        return self

    def __exit__(self, *exc):
        self.peak = status_kib("VmHWM")

    @property
    def mib(self) -> float:
        return (self.peak - self.base) / 1024


@dataclass
class Row:
    item: str
    method: str
    seconds: float
    mib: float
    runs: int
    note: str = ""
    depass: bool = False  # a DePass row: the item's reference for the ratios


@dataclass
class Case:
    name: str
    model: object
    tokens: Tensor
    answers: Tensor
    wrong: Tensor
    repeats: int  # best of this many runs
    slow_repeats: int  # ... for the slow rows (IG, all heads, neurons, patching, chunk_size)
    layer: int | None  # the layer whose neurons are attributed (None: attention-only)
    # Subsets timed instead of the whole, scaled linearly (None: the whole is timed):
    token_subset: int | None = None  # decompose: a Split of this many single positions + rest
    position_subset: int | None = None  # occlusion: this many deletions
    ig_steps: int = 100  # IG steps actually run (the row is scaled to 100)
    ig_batch: int | None = None  # Captum's internal_batch_size
    head_layers: int | None = None  # decompose Heads(layers) and patching: this many layers
    neuron_subset: int | None = None  # decompose Neurons and ablation: this many neurons
    forward_batch: int | None = None  # plain forward: this many copies instead of M
    chunks: list[tuple[str, int | None]] = field(default_factory=list)  # (rule, chunk_size)
    rows: list[Row] = field(default_factory=list)


def timed(fn: Callable[[], object], repeats: int) -> tuple[float, float, object]:
    """Best wall time over `repeats` calls, the largest peak memory (MiB), the last result."""
    best, mib, out = float("inf"), 0.0, None
    for _ in range(repeats):
        out = None  # the previous result is not part of this call's memory
        with PeakMemory() as mem:
            start = time.perf_counter()
            out = fn()
            best = min(best, time.perf_counter() - start)
        mib = max(mib, mem.mib)
    return best, mib, out


def run(case: Case, item: str, method: str, fn, scale: float = 1.0, note: str = "",
        depass: bool = False, repeats: int | None = None):
    repeats = repeats or case.repeats
    seconds, mib, out = timed(fn, repeats)
    case.rows.append(Row(item, method, seconds * scale, mib, repeats, note, depass))
    print(f"  {case.name} | {item} | {method} | {seconds * scale:.3f} s | {mib:.0f} MiB {note}",
          flush=True)
    return out


# --- subsets of the N-, L·H- and d_mlp-fold baselines (the library runs them all) ---

def occlusion_subset(model, tokens, answers, positions: int, chunk: int = 16) -> Tensor:
    """log p(answer) drops for the first `positions` deletions, `chunk` per forward (as
    baselines.occlusion does for all N - 1)."""
    batch, n = tokens.shape
    eye = torch.eye(n, dtype=torch.bool)
    with torch.no_grad():
        base = baselines.answer_logprob(model(tokens), answers)
        out = []
        for start in range(0, positions, chunk):
            ps = range(start, min(start + chunk, positions))
            shorter = torch.cat([baselines.delete_positions(tokens, eye[p].expand(batch, n)) for p in ps])
            logp = baselines.answer_logprob(model(shorter), answers.repeat(len(ps)))
            out.append(base.repeat(len(ps)) - logp)
    return torch.cat(out)


def ablate_subset(model, tokens, metric, hook: str, units: int, n_units: int, heads: bool,
                  chunk: int = 64) -> Tensor:
    """Zero-ablation of units 0..units-1 at `hook`, `chunk` per forward as batch copies (as
    baselines.activation_patching does for all of them)."""
    batch = tokens.shape[0]
    effects = []
    with torch.no_grad():
        base = metric(model(tokens))
        for start in range(0, units, chunk):
            k = min(chunk, units - start)
            unit = torch.zeros(k, n_units, dtype=torch.bool)
            unit[torch.arange(k), torch.arange(start, start + k)] = True
            mask = unit[:, None, None, :, None] if heads else unit[:, None, None, :]

            def patch(x, hook, mask=mask, k=k):
                return x.reshape(k, batch, *x.shape[1:]).masked_fill(mask, 0).reshape(x.shape)

            logits = model.run_with_hooks(tokens.repeat(k, 1), fwd_hooks=[(hook, patch)])
            effects += [base - metric(p) for p in logits.reshape(k, batch, *logits.shape[1:])]
    return torch.stack(effects)


# --- the five items ---

def split_of_positions(model, tokens, k: int) -> Split:
    """Components: positions 0..k-1 one each, and the rest of the embedding as one more: a
    token-level decomposition with k + 1 components instead of N."""
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=[baselines.EMBED_HOOK])
    x = cache[baselines.EMBED_HOOK]
    parts = torch.zeros(k + 1, *x.shape, dtype=x.dtype)
    for p in range(k):
        parts[p, :, p] = x[:, p]
    parts[k] = x - parts[:k].sum(0)
    return Split(baselines.EMBED_HOOK, parts)


def token_level(case: Case) -> dict[str, Tensor]:
    """Item 1; returns the decomposition's logits (the unchunked reference of item 5)."""
    m, toks, ans = case.model, case.tokens, case.answers
    n, out = toks.shape[1], {}

    def depass_tokens():  # baselines.depass_tokens, keeping the logits for item 5
        dec = tl_depass.decompose(m, toks, mlp_rule="softmax", keep=[])
        out["softmax"] = dec.logits
        return dec.logit_attribution(ans)

    if case.token_subset is None:
        run(case, "1 tokens", "DePass decompose (softmax)", depass_tokens, depass=True,
            note="keep=[] (logits only)")
    else:
        k, split = case.token_subset, split_of_positions(m, toks, case.token_subset)
        run(case, "1 tokens", "DePass decompose (softmax)",
            lambda: tl_depass.decompose(m, toks, split, keep=[]).logit_attribution(ans), depass=True,
            scale=(n + 2) / (k + 3),
            note=f"extrapolated from a Split of {k} positions + rest ({k + 3} of {n + 2} slots)")
    run(case, "1 tokens", "DePass attribute (ratio, backward)",
        lambda: tl_depass.attribute(m, toks, answer=ans, mlp_rule="ratio", method="backward"),
        depass=True)
    if case.position_subset is None:
        run(case, "1 tokens", f"occlusion ({n - 1} deletions)", lambda: baselines.occlusion(m, toks, ans))
    else:
        k = case.position_subset
        run(case, "1 tokens", f"occlusion ({n - 1} deletions)",
            lambda: occlusion_subset(m, toks, ans, k), scale=(n - 1) / k,
            note=f"extrapolated from {k} deletions")
    steps, batch = case.ig_steps, case.ig_batch
    run(case, "1 tokens", "Integrated Gradients (100 steps)",
        lambda: baselines.integrated_gradients(m, toks, ans, steps=steps, internal_batch_size=batch),
        scale=100 / steps, note="" if steps == 100 else f"extrapolated from {steps} steps",
        repeats=case.slow_repeats)
    return out


def all_heads(case: Case) -> None:
    m, toks, ans, wrong = case.model, case.tokens, case.answers, case.wrong
    cfg, slow = m.cfg, case.slow_repeats
    k = case.head_layers or cfg.n_layers
    scale = cfg.n_layers / k
    note = "" if k == cfg.n_layers else f"extrapolated from {k} of {cfg.n_layers} layers"
    run(case, "2 heads", "DePass decompose Heads() (softmax)",
        lambda: tl_depass.decompose(m, toks, Heads(range(k)), keep=[]).head_scores(ans, wrong),
        depass=True, scale=scale, note=note, repeats=slow)
    run(case, "2 heads", "DePass attribute Heads() (ratio, backward)",
        lambda: tl_depass.attribute(m, toks, Heads(), answer=ans, wrong=wrong, mlp_rule="ratio",
                                    method="backward"), depass=True)
    metric = baselines.logit_diff_metric(ans, wrong)
    what = f"patching every head ({cfg.n_layers * cfg.n_heads} zero-ablations)"
    if k == cfg.n_layers:
        run(case, "2 heads", what, lambda: baselines.activation_patching(m, toks, metric, Heads()),
            repeats=slow)
    else:
        def some_layers():
            return [ablate_subset(m, toks, metric, f"blocks.{i}.attn.hook_z", cfg.n_heads, cfg.n_heads,
                                  heads=True) for i in range(k)]
        run(case, "2 heads", what, some_layers, scale=scale, note=note, repeats=slow)


def one_layer_neurons(case: Case) -> None:
    m, toks, ans, wrong, layer = case.model, case.tokens, case.answers, case.wrong, case.layer
    d_mlp, item, slow = m.cfg.d_mlp, f"3 neurons L{layer}", case.slow_repeats
    k = case.neuron_subset or d_mlp
    scale, note = d_mlp / k, "" if k == d_mlp else f"extrapolated from {k} neurons"
    run(case, item, "DePass decompose Neurons (softmax)",
        lambda: tl_depass.decompose(m, toks, Neurons(layer, None if k == d_mlp else range(k)), keep=[]
                                    ).neuron_scores(ans, wrong),
        scale=(d_mlp + 3) / (k + 3),  # slots: the neurons, rest, bias and the zero probe
        note=note, depass=True, repeats=slow)
    run(case, item, "DePass attribute Neurons (ratio, backward)",
        lambda: tl_depass.attribute(m, toks, Neurons(layer), answer=ans, wrong=wrong,
                                    mlp_rule="ratio", method="backward"), depass=True)
    metric = baselines.logit_diff_metric(ans, wrong)
    what = f"ablating each neuron ({d_mlp} zero-ablations)"
    if k == d_mlp:
        run(case, item, what, lambda: baselines.activation_patching(m, toks, metric, Neurons(layer)),
            repeats=slow)
    else:
        run(case, item, what, lambda: ablate_subset(m, toks, metric, f"blocks.{layer}.mlp.hook_post", k,
                                                    d_mlp, heads=False),
            scale=scale, note=note, repeats=slow)


def plain_forward(case: Case) -> None:
    m, toks = case.model, case.tokens
    big_m = toks.shape[1] + 1
    copies = case.forward_batch or big_m
    folded = toks.repeat(copies, 1)
    with torch.no_grad():
        run(case, "4 forward", f"plain forward, batch M={big_m} x {toks.shape[0]}", lambda: m(folded),
            scale=big_m / copies, note="" if copies == big_m else f"extrapolated from batch {copies}")


def chunk_sweep(case: Case, reference: dict[str, Tensor]) -> None:
    m, toks = case.model, case.tokens
    for rule, chunk in case.chunks:
        if chunk is None and rule in reference:
            continue  # item 1's run
        out = run(case, "5 chunk_size", f"decompose tokens ({rule}), chunk_size={chunk}",
                  lambda rule=rule, chunk=chunk: tl_depass.decompose(m, toks, mlp_rule=rule, keep=[],
                                                                     chunk_size=chunk).logits,
                  repeats=case.slow_repeats)
        if chunk is None:
            reference[rule] = out
        elif rule in reference:
            diff = (out - reference[rule]).abs().max().item()
            case.rows[-1].note = "identical to unchunked" if diff == 0 else f"max abs diff {diff:.1e}"
        del out


# --- the models ---

def gpt2_shaped(n: int) -> tuple[object, Tensor]:
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(n_layers=12, d_model=768, n_heads=12, d_head=64, d_mlp=3072,
                                  d_vocab=VOCAB, n_ctx=1024, act_fn="gelu_new",
                                  normalization_type="LN", seed=0)
    torch.manual_seed(0)
    model = HookedTransformer(cfg).eval()
    with torch.no_grad():  # every parameter random (TL initialises biases and LN to 0 / 1)
        for name, p in model.named_parameters():
            if name.endswith(("b_Q", "b_K", "b_V", "b_O", "b_in", "b_out", "b_U", ".b")):
                p.normal_(0, 0.02)
            elif name.endswith(".w"):
                p.normal_(1, 0.1)
    tokens = torch.randint(0, VOCAB, (1, n), generator=torch.Generator().manual_seed(n))
    return model, tokens


VOCAB = 8192  # GPT-2's 50257 would make DePass's [component, pos, d_vocab] logits 13 GB at 256


def cases(quick: bool) -> list[Case]:
    out = []
    for name in tl_depass.models.names():
        model = tl_depass.models.load(name)
        batch = tl_depass.models.tasks.generate(name, 32, seed=0)
        n = batch.tokens.shape[1]
        out.append(Case(f"{name} (32 prompts x {n} tokens)", model, batch.tokens, batch.answers,
                        batch.wrong, repeats=3, slow_repeats=3, layer=None if model.cfg.attn_only else 0,
                        chunks=[("softmax", None), ("softmax", n // 2), ("ratio", None), ("ratio", n // 2),
                                ("ratio", 2)]))
    for n in (64,) if quick else (64, 256):
        model, tokens = gpt2_shaped(n)
        answers, wrong = torch.tensor([1]), torch.tensor([2])
        name = f"GPT-2-shaped random, 1 x {n} tokens"
        if n == 64:
            out.append(Case(name, model, tokens, answers, wrong, repeats=2, slow_repeats=1, layer=6,
                            neuron_subset=64, ig_batch=10,
                            chunks=[("ratio", None), ("ratio", 16), ("ratio", 4)]))
        else:
            out.append(Case(name, model, tokens, answers, wrong, repeats=1, slow_repeats=1, layer=6,
                            token_subset=16, position_subset=32, ig_steps=10, ig_batch=5,
                            head_layers=1, neuron_subset=16, forward_batch=17))
    return out


# --- the tables ---

def table(case: Case) -> list[str]:
    """Ratios are this row's time over the DePass rows' times of the same item (item 4: over
    item 1's decompose; item 5: over the unchunked run of the same rule)."""
    lines = [f"### {case.name}", "",
             "| item | method | seconds | runs | / DePass forward | / DePass backward | peak MiB | note |",
             "|---|---|---|---|---|---|---|---|"]
    for row in case.rows:
        if row.item.startswith("4"):
            refs = [r for r in case.rows if r.method == "DePass decompose (softmax)"]
        elif row.item.startswith("5"):
            rule = row.method.split(",")[0]
            refs = [r for r in case.rows if r.item == row.item and r.method.endswith("None")
                    and r.method.split(",")[0] == rule] or [
                r for r in case.rows if "softmax" in rule and r.method == "DePass decompose (softmax)"]
        else:
            refs = [r for r in case.rows if r.item == row.item and r.depass]
        ratios = [f"{row.seconds / r.seconds:.2f}" for r in refs] + ["", ""]
        lines.append(f"| {row.item} | {row.method} | {row.seconds:.3f} | {row.runs} | {ratios[0]} | "
                     f"{ratios[1]} | {row.mib:.0f} | {row.note} |")
    return lines


def targets(all_cases: list[Case]) -> list[str]:
    lines = ["### Targets", "",
             "| model | heads: patching / DePass fwd (>= 3) | heads: patching / backward (>= 20) | "
             "neurons: ablation / DePass fwd (>= 20) | neurons: ablation / backward (>= 20) | "
             "decompose / forward at batch M (<= 1.5) |", "|---|---|---|---|---|---|"]

    def ratio(case, item, alt, ref) -> str:
        a = [r for r in case.rows if r.item.startswith(item) and r.method.startswith(alt)]
        b = [r for r in case.rows if r.item.startswith(item) and r.method.startswith(ref)]
        return f"{a[0].seconds / b[0].seconds:.2f}" if a and b else "n/a"

    for c in all_cases:
        dec = [r for r in c.rows if r.method == "DePass decompose (softmax)"]
        plain = [r for r in c.rows if r.item.startswith("4")]
        fwd = f"{dec[0].seconds / plain[0].seconds:.2f}" if dec and plain else "n/a"
        lines.append(f"| {c.name} | {ratio(c, '2', 'patching', 'DePass decompose')} | "
                     f"{ratio(c, '2', 'patching', 'DePass attribute')} | "
                     f"{ratio(c, '3', 'ablating', 'DePass decompose')} | "
                     f"{ratio(c, '3', 'ablating', 'DePass attribute')} | {fwd} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="bundled models and 64 tokens only")
    parser.add_argument("--only", default="", help="run only the models whose name contains this")
    args = parser.parse_args()
    torch.set_num_threads(2)
    start = time.perf_counter()
    all_cases = [c for c in cases(args.quick) if args.only in c.name]
    warm = all_cases[0]  # first calls pay one-time costs (imports, type checks): not timed
    baselines.depass_tokens(warm.model, warm.tokens[:1], warm.answers[:1])
    for case in all_cases:
        print(f"{case.name}: best of {case.repeats} ({case.slow_repeats} for the slow rows)", flush=True)
        reference = token_level(case)
        all_heads(case)
        if case.layer is not None:
            one_layer_neurons(case)
        plain_forward(case)
        chunk_sweep(case, reference)
        del reference
        print(f"  ({time.perf_counter() - start:.0f} s since the start)", flush=True)
    print()
    now = datetime.datetime.now(datetime.timezone.utc)
    print(f"{now:%Y-%m-%d %H:%M} UTC, {platform.machine()}, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"total {time.perf_counter() - start:.0f} s\n")
    for case in all_cases:
        print("\n".join(table(case)) + "\n")
    print("\n".join(targets(all_cases)))


if __name__ == "__main__":
    main()
