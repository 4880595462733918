"""`python -m tl_depass.models.mechanisms [--n 200]`: the measurements behind docs/models.md.

For each bundled model: what DePass says (top input position, top head, top neurons) next to an
independent causal check (editing the input, activation patching, zero ablation).
"""

import argparse
import warnings

import torch

import tl_depass
from tl_depass import commands, models
from tl_depass.engine.backends import Model
from tl_depass.engine.hooks import block_hook, mlp_out
from tl_depass.models import tasks


def predictions(model: Model, tokens):
    with torch.no_grad():
        return model(tokens)[:, -1].argmax(-1)


def logit_diff(batch):
    rows = torch.arange(len(batch))
    return lambda logits: (logits[rows, -1, batch.answers] - logits[rows, -1, batch.wrong]).mean()


def top_position_share(model: Model, batch, wrong: bool) -> float:
    dec = tl_depass.decompose(model, batch.tokens)
    score = dec.logit_attribution(batch.answers, batch.wrong if wrong else None)[:-1]
    top = score.argmax(0)
    return batch.key_positions[torch.arange(len(batch)), top].float().mean().item()


def table(name: str, values: torch.Tensor) -> str:
    rows = [f"  {name} " + " ".join(f"H{h:<6}" for h in range(values.shape[1]))]
    rows += [f"  L{layer:<{len(name) - 1}} " + " ".join(f"{v:+7.2f}" for v in values[layer].tolist())
             for layer in range(values.shape[0])]
    return "\n".join(rows)


def common(model: Model, name: str, batch) -> None:
    acc = (predictions(model, batch.tokens) == batch.answers).float().mean().item()
    moved = (predictions(model, batch.corrupted) == batch.wrong).float().mean().item()
    print(f"\n== {name}: accuracy {acc:.3f}; corrupted prompts answered with `wrong`: {moved:.3f}")
    for wrong in (False, True):
        what = "logit difference answer - wrong" if wrong else "answer logit"
        print(f"  DePass token level ({what}): top position is the key position in "
              f"{top_position_share(model, batch, wrong):.3f} of prompts")


def heads(model: Model, batch, n: int) -> None:
    small = tasks.TaskBatch(*(getattr(batch, f)[:n] for f in
                              ("tokens", "answers", "wrong", "corrupted", "key_positions")))
    metric = logit_diff(small)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cmp = tl_depass.evaluate.compare.with_patching(model, small.tokens, small.corrupted, metric, "heads")
    plain = tl_depass.evaluate.compare.plain_ablation(model, small.tokens, metric)
    print(f"  heads, metric = mean logit difference over {n} prompts "
          f"(clean {metric(model(small.tokens)).item():.2f}, corrupted "
          f"{metric(model(small.corrupted)).item():.2f})")
    print(table("DePass", cmp.depass))
    print(table("patch ", cmp.patched))  # the raw patched metric (docs/models.md "patched")
    print(table("ablate", plain))
    print(f"  DePass vs patching: Pearson {cmp.pearson:.3f}, Spearman {cmp.spearman:.3f}")
    _, cache = model.run_with_cache(small.tokens)
    rows, key = torch.arange(n), small.key_positions.float().argmax(1)
    for layer in range(model.cfg.n_layers):
        pattern = cache[block_hook(layer, "attn.hook_pattern")]
        to_key = pattern[rows, :, -1, key].mean(0)
        prev_at_key = pattern[rows, :, key, key - 1].mean(0)
        print(f"  L{layer} attention last->key {[round(x, 2) for x in to_key.tolist()]}, "
              f"key->key-1 {[round(x, 2) for x in prev_at_key.tolist()]}")


def neurons(model: Model, batch, layer: int, k: int) -> None:
    dec = tl_depass.decompose(model, batch.tokens, tl_depass.Neurons(layer))
    scores = dec.neuron_scores(batch.answers)[:, layer]
    rows = torch.arange(len(batch))

    def changed(idx) -> float:
        def hook(post, hook):
            post = post.clone()
            post[rows[:, None], -1, idx] = 0
            return post
        with torch.no_grad():
            hooks = [(block_hook(layer, "mlp.hook_post"), hook)]
            logits = model.run_with_hooks(batch.tokens, fwd_hooks=hooks)
        return (logits[:, -1].argmax(-1) != batch.answers).float().mean().item()

    g = torch.Generator().manual_seed(0)
    random = torch.stack([torch.randperm(model.cfg.d_mlp, generator=g)[:k] for _ in rows])
    print(f"  L{layer} neurons: all neurons' share of the answer logit {scores.sum(1).mean():.2f}, "
          f"top neuron {scores.max(1).values.mean():.2f}; zeroing at the last position flips the "
          f"answer: DePass top {k}: {changed(scores.topk(k, 1).indices):.3f}, bottom {k}: "
          f"{changed((-scores).topk(k, 1).indices):.3f}, random {k}: {changed(random):.3f}")
    for mlp in range(model.cfg.n_layers):
        zero = [(mlp_out(mlp), lambda x, hook: torch.zeros_like(x))]
        with torch.no_grad():
            acc = (model.run_with_hooks(batch.tokens, fwd_hooks=zero)[:, -1].argmax(-1)
                   == batch.answers).float().mean().item()
        print(f"  accuracy with MLP {mlp} zeroed: {acc:.3f}")


def fresh_name_oracle(model: Model, batch) -> None:
    dec = tl_depass.decompose(model, batch.tokens)
    top = dec.logit_attribution(batch.answers)[:-1].argmax(0)
    names = tasks.ids("ioi", tasks.NAMES)
    fresh = torch.stack([names[~torch.isin(names, t)][0] for t in batch.tokens])
    edited = batch.tokens.clone()
    edited[torch.arange(len(batch)), top] = fresh
    print(f"  a fresh name written at DePass's top position becomes the answer in "
          f"{(predictions(model, edited) == fresh).float().mean().item():.3f} of prompts")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=commands.description(__doc__))
    parser.add_argument("--n", type=int, default=200, help="prompts per task (tasks seed 0)")
    args = parser.parse_args(argv)
    with commands.torch_settings(threads=1):
        for name in models.names():
            model, batch = models.load(name), tasks.generate(name, args.n, seed=0)
            common(model, name, batch)
            heads(model, batch, min(args.n, 64))
            if name == "recall":
                neurons(model, batch, 0, model.cfg.d_mlp // 4)
            if name == "ioi":
                fresh_name_oracle(model, batch)


if __name__ == "__main__":
    commands.run_command("python -m tl_depass.models.mechanisms", main)
