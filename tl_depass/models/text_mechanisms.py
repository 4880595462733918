"""`python -m tl_depass.models.text_mechanisms [--n 32]`: what `pystdlib` learned, found with
DePass and checked by interventions (the measurements behind docs/models.md).

For each probe family of `tl_depass.models.text_probes` (pairs of code prompts that differ in one
token): does the model follow the cue; which input position DePass credits for the logit
difference (answer − wrong), against the position that differs; which heads DePass credits,
beside activation patching (restoration: one head's clean output patched into the corrupted run,
minus the corrupted run's metric) and zero ablation of the heads DePass ranks first; and where the
top head attends. Then induction on repeated random tokens (`[BOS, s, s]`).
"""

import argparse
import contextlib
import io
import warnings

import einops
import torch
import torch.nn.functional as F

import tl_depass
from tl_depass import commands, models
from tl_depass.engine.backends import Model
from tl_depass.engine.hooks import attn_z, block_hook
from tl_depass.evaluate.metrics import correlation
from tl_depass.models import text_probes
from tl_depass.models.text_probes import Pairs


def logit_diff(pairs: Pairs, per_prompt: bool = False):
    rows = torch.arange(len(pairs))

    def metric(logits):
        diff = logits[rows, -1, pairs.answers] - logits[rows, -1, pairs.wrong]
        return diff if per_prompt else diff.mean()
    return metric


def zero_heads(heads: list[tuple[int, int]]) -> list:
    """Hooks that zero the outputs (z) of `heads`, a list of (layer, head), at every position."""
    def zero(h: int):
        def hook(z, hook):
            z = z.clone()
            z[:, :, h] = 0
            return z
        return hook
    return [(attn_z(layer), zero(h)) for layer, h in heads]


@torch.no_grad()
def run(model: Model, tokens, hooks=()):
    return model.run_with_hooks(tokens, fwd_hooks=list(hooks)) if hooks else model(tokens)


def patching(model: Model, pairs: Pairs) -> torch.Tensor:
    """Restoration of the mean logit difference by each head's clean output (all positions)."""
    from transformer_lens import patching as tl_patching

    metric = logit_diff(pairs)
    _, cache = model.run_with_cache(pairs.tokens)
    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):  # no progress bars
        warnings.simplefilter("ignore")
        raw = tl_patching.get_act_patch_attn_head_out_all_pos(model, pairs.corrupted, cache, metric)
    return raw - metric(run(model, pairs.corrupted))


def grid(values: torch.Tensor, name: str) -> str:
    head = f"  {name:<8}" + "".join(f"  H{h:<5}" for h in range(values.shape[1]))
    return "\n".join([head] + [f"  L{layer:<7}" + "".join(f" {v:+6.2f}" for v in row.tolist())
                               for layer, row in enumerate(values)])


def family(model: Model, pairs: Pairs, k: int = 2) -> dict:
    """The measurements for one probe family (printed, and returned for the tests and docs)."""
    metric, per = logit_diff(pairs), logit_diff(pairs, per_prompt=True)
    clean, corrupt = run(model, pairs.tokens), run(model, pairs.corrupted)
    out = {"n": len(pairs), "clean": metric(clean).item(), "corrupted": metric(corrupt).item(),
           "clean_prefers_answer": (per(clean) > 0).float().mean().item(),
           "corrupted_prefers_wrong": (per(corrupt) < 0).float().mean().item(),
           "answer_is_top1": (clean[:, -1].argmax(-1) == pairs.answers).float().mean().item()}
    dec = tl_depass.decompose(model, pairs.tokens)
    top = dec.logit_attribution(pairs.answers, pairs.wrong)[:-1].argmax(0)
    out["depass_top_position_is_key"] = pairs.key_positions[torch.arange(len(pairs)), top
                                                             ].float().mean().item()
    heads = tl_depass.decompose(model, pairs.tokens, tl_depass.Heads()).head_scores(
        pairs.answers, pairs.wrong).mean(0)
    patched = patching(model, pairs)
    out["heads_depass"], out["heads_patching"] = heads, patched
    out["pearson"], out["spearman"] = correlation(heads, patched)
    H = model.cfg.n_heads
    order = [(i // H, i % H) for i in heads.flatten().argsort(descending=True).tolist()]
    by_patching = [(i // H, i % H) for i in patched.flatten().argsort(descending=True).tolist()]
    least = [(i // H, i % H) for i in heads.flatten().abs().argsort().tolist()]
    out["top_heads"], out["top_patched_heads"] = order[:k], by_patching[:k]
    out["ablate_top"] = metric(run(model, pairs.tokens, zero_heads(order[:k]))).item()
    out["ablate_least"] = metric(run(model, pairs.tokens, zero_heads(least[:k]))).item()
    out["ablate_top_patched"] = metric(run(model, pairs.tokens, zero_heads(by_patching[:k]))).item()
    _, cache = model.run_with_cache(pairs.tokens)
    key = pairs.key_positions.float().argmax(1)
    rows = torch.arange(len(pairs))
    out["attention_to_key"] = torch.stack([  # [layer, head]: from the last position
        cache[block_hook(layer, "attn.hook_pattern")][rows, :, -1, key].mean(0)
        for layer in range(model.cfg.n_layers)])
    return out


def print_family(name: str, r: dict, text: str) -> None:
    print(f"\n== {name} ({r['n']} prompt pairs), e.g. {text!r}")
    print(f"  logit difference answer − wrong: clean {r['clean']:+.2f}, corrupted {r['corrupted']:+.2f};"
          f" clean prefers the answer in {r['clean_prefers_answer']:.2f}, corrupted prefers the other "
          f"in {r['corrupted_prefers_wrong']:.2f}; answer is the top-1 token in {r['answer_is_top1']:.2f}")
    print(f"  DePass token level: top position is the one that differs in "
          f"{r['depass_top_position_is_key']:.2f} of prompts")
    print(grid(r["heads_depass"], "DePass"))
    print(grid(r["heads_patching"], "patched"))
    print(f"  DePass vs patching: Pearson {r['pearson']:.3f}, Spearman {r['spearman']:.3f}")
    tops = ", ".join(f"L{a}H{b}" for a, b in r["top_heads"])
    print(f"  zeroing DePass's top heads ({tops}): logit difference {r['clean']:+.2f} -> "
          f"{r['ablate_top']:+.2f}; zeroing the {len(r['top_heads'])} heads with the smallest |DePass|:"
          f" {r['ablate_least']:+.2f}")
    tops = ", ".join(f"L{a}H{b}" for a, b in r["top_patched_heads"])
    print(f"  zeroing patching's top heads ({tops}): {r['ablate_top_patched']:+.2f}")
    print(grid(r["attention_to_key"], "attn->key"))


@torch.no_grad()
def head_paths(model: Model, pairs: Pairs, head: int) -> dict:
    """Where a layer-0 head's output acts (2-layer models): the mean logit difference with that
    output removed from one reader at a time, everything else as in the clean run: MLP 0's input,
    layer 1's attention input (queries, keys and values), MLP 1's input, or the final residual
    stream (the direct path); and zeroed everywhere (`zeroed`)."""
    metric = logit_diff(pairs)
    _, cache = model.run_with_cache(pairs.tokens)
    out = einops.einsum(cache[attn_z(0)][:, :, head], model.W_O[0, head], "b p h, h d -> b p d")

    def mlp(layer: int):
        resid = cache[block_hook(layer, "hook_resid_mid")] - out
        new = model.blocks[layer].mlp(model.blocks[layer].ln2(resid))
        return [(block_hook(layer, "hook_mlp_out"), lambda t, hook: new)]

    resid = model.blocks[1].ln1(cache[block_hook(1, "hook_resid_pre")] - out)
    qkv = {x: einops.einsum(resid, W[1], "b p d, n d h -> b p n h") + b[1] for x, W, b in
           (("q", model.W_Q, model.b_Q), ("k", model.W_K, model.b_K), ("v", model.W_V, model.b_V))}
    attention = [(block_hook(1, f"attn.hook_{x}"), lambda t, hook, new=new: new) for x, new in qkv.items()]
    direct = [(block_hook(1, "hook_resid_post"), lambda r, hook: r - out)]
    return {name: metric(run(model, pairs.tokens, hooks)).item() for name, hooks in
            (("clean", []), ("mlp0", mlp(0)), ("attention1", attention), ("mlp1", mlp(1)),
             ("direct", direct), ("zeroed", zero_heads([(0, head)])))}


@torch.no_grad()
def repeated_tokens(model: Model, n: int = 32, length: int = 40, seed: int = 0) -> dict:
    """Loss on `[BOS, s, s]` (s: `length` random tokens) in the first and second copy, each head's
    induction score (attention from a token of the second copy to the token after its first
    occurrence) and previous-token score, and the second copy's loss with the top induction heads
    zeroed."""
    g = torch.Generator().manual_seed(seed)
    s = torch.randint(1, model.cfg.d_vocab, (n, length), generator=g)
    bos = torch.full((n, 1), model.tokenizer.bos_token_id)
    tokens = torch.cat([bos, s, s], 1)

    def losses(hooks=()):
        logits = run(model, tokens, hooks)[:, :-1]
        loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten(), reduction="none")
        loss = loss.view(n, -1)
        return loss[:, 1:length].mean().item(), loss[:, length + 1:].mean().item()

    _, cache = model.run_with_cache(tokens)
    q = torch.arange(length + 1, 2 * length + 1)  # positions in the second copy
    induction = torch.stack([cache[block_hook(layer, "attn.hook_pattern")][:, :, q, q - length + 1]
                             .mean((0, 2)) for layer in range(model.cfg.n_layers)])
    p = torch.arange(1, 2 * length + 1)
    previous = torch.stack([cache[block_hook(layer, "attn.hook_pattern")][:, :, p, p - 1].mean((0, 2))
                            for layer in range(model.cfg.n_layers)])
    H = model.cfg.n_heads
    top = [(i // H, i % H) for i in induction.flatten().argsort(descending=True)[:2].tolist()]
    return {"loss_first": losses()[0], "loss_second": losses()[1], "induction": induction,
            "previous": previous, "top_induction": top, "loss_second_ablated": losses(zero_heads(top))[1]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=commands.description(__doc__))
    parser.add_argument("--n", type=int, default=32, help="prompt pairs per family (seed 0)")
    parser.add_argument("--model", default="pystdlib", help="a bundled name or a .json path")
    args = parser.parse_args(argv)
    with commands.torch_settings(threads=1):
        model = models.load(args.model)
        for name in text_probes.FAMILIES:
            pairs = text_probes.make(model, name, args.n, seed=0)
            print_family(name, family(model, pairs), pairs.texts[0])
            if name == "indent":
                paths = head_paths(model, pairs, 0)
                print("  L0H0's output removed from one reader at a time: " + ", ".join(
                    f"{k} {v:+.2f}" for k, v in paths.items()))
        r = repeated_tokens(model)
        print(f"\n== repeated random tokens [BOS, s, s], |s| = 40: loss {r['loss_first']:.2f} (first "
              f"copy), {r['loss_second']:.2f} (second copy); with the top induction heads "
              f"{r['top_induction']} zeroed: {r['loss_second_ablated']:.2f}")
        print(grid(r["induction"], "induct."))
        print(grid(r["previous"], "prev."))


if __name__ == "__main__":
    commands.run_command("python -m tl_depass.models.text_mechanisms", main)
