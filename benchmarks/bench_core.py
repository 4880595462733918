"""Core benchmark: the decomposed forward against what it replaces (issue 15's speed rows).

    python benchmarks/bench_core.py                 # small settings, CPU, 1 thread
    python benchmarks/bench_core.py --n 64 --rounds 5 --layers 6

Three tables, each a ratio measured side by side in one process, interleaved rounds, the minimum
over rounds (CPU: process time, `torch.set_num_threads(1)`; CUDA: wall time after a synchronize):

- token level (softmax and ratio rules, `logits="last"`) vs one plain forward at batch M
  (M = N + 1 components: N tokens and the bias);
- every head of every layer (softmax, forward mode; and the ratio rule through `attribute`'s
  backward path, reading the same logit) vs `transformer_lens.patching` of every head
  (`get_act_patch_attn_head_out_all_pos`, one forward per head);
- every neuron of layer L/2 (softmax) vs zero-ablating each neuron (batched full forwards).

Random HookedTransformer (gelu_new, LayerNorm), float32. `benchmarks/gpu.py` runs the same on CUDA.
`--bridge`: the same tables for a TransformerBridge over a random Hugging Face GPT-2 of the same
shape (`--bridge llama`: a Llama, RMSNorm, SwiGLU, rotary, GQA 2:1), built offline (TL 3.9 and 4.x).

    python benchmarks/bench_core.py --memory        # the README's table: seconds and peak memory

`--memory`: decompose (defaults) vs one plain forward at batch M, N = 64 and 256, with and without
`chunk_size`; each peak is the resident memory of a fresh subprocess minus its baseline.
"""

import argparse
import multiprocessing as mp
import resource
import time

import torch
from transformer_lens import patching

import tl_depass
from tl_depass.levels.units import Heads, Neurons


def make_model(layers: int, d_model: int, d_vocab: int, n_ctx: int, device: str):
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(n_layers=layers, d_model=d_model, n_heads=d_model // 32, d_head=32,
                                  d_mlp=4 * d_model, d_vocab=d_vocab, n_ctx=n_ctx, act_fn="gelu_new",
                                  normalization_type="LN", seed=0, device=device)
    return HookedTransformer(cfg).eval()


def make_bridge(kind: str, layers: int, d_model: int, d_vocab: int, n_ctx: int, device: str):
    """A TransformerBridge over a random Hugging Face GPT-2 or Llama (float32) of this shape."""
    import warnings

    import transformers
    from transformer_lens.model_bridge.sources import build_bridge_from_module

    torch.manual_seed(0)
    heads = d_model // 32
    if kind == "gpt2":
        arch, cfg = "GPT2LMHeadModel", transformers.GPT2Config(
            n_layer=layers, n_embd=d_model, n_head=heads, n_inner=4 * d_model, vocab_size=d_vocab,
            n_positions=n_ctx, activation_function="gelu_new", architectures=["GPT2LMHeadModel"])
    else:
        arch, cfg = "LlamaForCausalLM", transformers.LlamaConfig(
            num_hidden_layers=layers, hidden_size=d_model, num_attention_heads=heads,
            num_key_value_heads=heads // 2, intermediate_size=4 * d_model, vocab_size=d_vocab,
            max_position_embeddings=n_ctx, architectures=["LlamaForCausalLM"])
    hf = getattr(transformers, arch)(cfg).eval().to(device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build_bridge_from_module(hf, arch, hf_config=hf.config)


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


def ablate_neurons(model, tokens: torch.Tensor, layer: int, batch: int) -> None:
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
    shape = (args.layers, args.d_model, args.d_vocab, max(args.n, 8), dev)
    model = make_bridge(args.bridge, *shape) if args.bridge else make_model(*shape)
    tokens = torch.randint(0, args.d_vocab, (1, args.n), device=dev)
    other = torch.randint(0, args.d_vocab, (1, args.n), device=dev)
    only = set(args.only.split(","))
    with torch.no_grad():
        if "tokens" in only:
            rows += token_rows(args, model, tokens)
        if "heads" in only:
            rows += head_rows(args, model, tokens, other)
        if "neurons" in only:
            rows += neuron_rows(args, model, tokens)
    return rows


def token_rows(args, model, tokens):
    t = interleaved({
        "forward": lambda: model(tokens.repeat(args.n + 1, 1)),
        "softmax": lambda: tl_depass.decompose(model, tokens, mlp_rule="softmax", logits="last"),
        "ratio": lambda: tl_depass.decompose(model, tokens, mlp_rule="ratio", logits="last"),
    }, args.rounds, args.device)
    return [("token level, softmax", "one plain forward at batch M", t["softmax"] / t["forward"]),
            ("token level, ratio", "one plain forward at batch M", t["ratio"] / t["forward"])]


def head_rows(args, model, tokens, other):
    _, cache = model.run_with_cache(tokens)
    answer = int(model(tokens)[0, -1].argmax())

    def metric(logits):
        return logits[0, -1, answer]
    t = interleaved({
        "patch": lambda: patching.get_act_patch_attn_head_out_all_pos(model, other, cache, metric),
        "depass": lambda: tl_depass.decompose(model, tokens, Heads(), logits="last"),
        "backward": lambda: tl_depass.attribute(model, tokens, Heads(), answer=answer,
                                                mlp_rule="ratio", method="backward"),
    }, args.rounds, args.device)
    return [("all heads, softmax", "TL patching of every head", t["depass"] / t["patch"]),
            ("all heads, ratio, `attribute` backward path", "TL patching of every head",
             t["backward"] / t["patch"])]


def neuron_rows(args, model, tokens):
    layer = args.layers // 2
    t = interleaved({
        "ablate": lambda: ablate_neurons(model, tokens, layer, args.ablate_batch),
        "depass": lambda: tl_depass.decompose(model, tokens, Neurons(layer), logits="last"),
    }, args.rounds, args.device)
    return [(f"neurons of layer {layer}, softmax", "zero-ablating each (batched)",
             t["depass"] / t["ablate"])]


def measure_memory(kind: str, n: int, rule: str, chunk: int | None, queue) -> None:
    torch.manual_seed(0)
    m = make_model(4, 256, 1000, 256, "cpu")
    tokens = torch.randint(0, 1000, (1, n))
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    repeats = 3 if n <= 64 else 1
    with torch.no_grad():
        if kind == "forward":
            folded = tokens.repeat(n + 1, 1)
            seconds = min(timed(lambda: m(folded)) for _ in range(repeats))
        else:
            seconds = min(timed(lambda: tl_depass.decompose(m, tokens, mlp_rule=rule, chunk_size=chunk))
                          for _ in range(repeats))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base
    queue.put((seconds, peak / 1024))


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def in_subprocess(*args) -> tuple[float, float]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    p = ctx.Process(target=measure_memory, args=(*args, queue))
    p.start()
    result = queue.get()
    p.join()
    return result


def memory_table() -> None:
    print("| N tokens | what | seconds | / forward at batch M | peak MiB |")
    print("|---|---|---|---|---|")
    for n in (64, 256):
        fwd, fwd_mem = in_subprocess("forward", n, "", None)
        print(f"| {n} | plain forward, batch M={n + 1} | {fwd:.3f} | 1.00 | {fwd_mem:.0f} |", flush=True)
        for rule, chunk in [("softmax", None), ("ratio", None), ("softmax", n // 4), ("ratio", n // 4)]:
            sec, mem = in_subprocess("decompose", n, rule, chunk)
            what = f"decompose {rule}" + (f", chunk_size={chunk}" if chunk else "")
            print(f"| {n} | {what} | {sec:.3f} | {sec / fwd:.2f} | {mem:.0f} |", flush=True)


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
    p.add_argument("--only", default="tokens,heads,neurons", help="which tables (comma-separated)")
    p.add_argument("--bridge", nargs="?", const="gpt2", choices=("gpt2", "llama"),
                   help="a TransformerBridge over a random Hugging Face GPT-2 (or Llama)")
    p.add_argument("--memory", action="store_true", help="the seconds / peak memory table instead")
    return p


def main(device: str = "cpu") -> None:
    args = parser(device).parse_args()
    if args.memory:
        return memory_table()
    torch.set_num_threads(args.threads)
    what = f"TransformerBridge ({args.bridge})" if args.bridge else "HookedTransformer"
    print(f"{what}, torch {torch.__version__}, device {args.device}, {torch.get_num_threads()} thread(s); "
          f"{args.layers} layers, d_model {args.d_model}, d_vocab {args.d_vocab}, N = {args.n}; "
          f"min over {args.rounds} interleaved rounds\n")
    print("| what | vs | ratio (DePass time / baseline time) |")
    print("|---|---|---|")
    for what, vs, ratio in tables(args):
        print(f"| {what} | {vs} | {ratio:.3f} |", flush=True)


if __name__ == "__main__":
    main()
