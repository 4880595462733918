"""The `tl-depass` command (also `python -m tl_depass`).

    tl-depass explain                      # bundled `induction` model, a built-in prompt
    tl-depass explain --model ioi --level heads --out ioi.html
    tl-depass explain --model recall --level neurons --rule ratio
    tl-depass models                       # the bundled models and their tasks

`explain` prints the components that made the model predict its answer (their shares of the
logit, or of the logit difference to a wrong answer), the completeness error and the agreement
with activation patching, and writes a self-contained HTML report (see `tl_depass.app.explain`).
"""

import argparse
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from tl_depass import commands
from tl_depass.app import dataset as dataset_command
from tl_depass.app import explain as explanation
from tl_depass.engine.backends import Model
from tl_depass.engine.validate import unknown_words
from tl_depass.errors import DepassError

DEFAULT_MODEL = "induction"
#: Models with fewer parameters run on one thread: for them, waking more threads costs more than
#: it saves (a forward of the bundled models: 4 ms on one thread, 100+ ms on two busy cores).
SMALL = 5_000_000


WHAT = {"tokens": "each position's residual stream entering every layer",
        "heads": "every head's output at all positions", "modules": "attention and MLP outputs",
        "neurons": "each neuron of the layer at all positions"}

REST = {"heads": "each layer's residual stream before its heads",
        "modules": "each layer's residual stream before its blocks",
        "neurons": "the layer's residual stream without these neurons"}


class CliError(Exception):
    """A problem with the command line: printed as one line, exit status 1."""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tl-depass", description=(
        "DePass (decomposed forward pass) for TransformerLens models: which tokens, heads, "
        "modules or neurons made a model predict its answer."))
    sub = p.add_subparsers(dest="command")
    e = sub.add_parser("explain", help="explain one prediction; write an HTML report",
                       description="Explain the prediction at the last position of a prompt.")
    e.add_argument("--model", default=DEFAULT_MODEL, help=(
        "a bundled model (see `tl-depass models`), a path to a model's .json/.safetensors, or a "
        "TransformerLens pretrained name such as gpt2 (needs network). Default: %(default)s"))
    e.add_argument("--prompt", help="the prompt (default: a prompt of the bundled model's task)")
    e.add_argument("--target", help="the answer token (default: the model's top prediction)")
    e.add_argument("--wrong", help="a wrong answer token: explain logit(target) - logit(wrong) "
                   "(default: the task's wrong answer for the built-in prompt, else none)")
    e.add_argument("--corrupted", help="a corrupted prompt of the same length, for activation "
                   "patching (default: the task's corrupted prompt for the built-in prompt)")
    e.add_argument("--level", choices=explanation.LEVELS, default="tokens",
                   help="which components the summary lists (the report shows all). "
                   "Default: %(default)s")
    e.add_argument("--layer", type=int, help="the layer whose neurons are decomposed "
                   "(default: the layer whose MLP has the largest share of the metric)")
    e.add_argument("--rule", choices=("softmax", "max", "ratio"), default="softmax",
                   help="how MLP activations are shared (docs/rules.md). Default: %(default)s")
    e.add_argument("--patch-limit", type=int, default=512, help="patch at most this many "
                   "neurons (a random sample above it; one forward each). Default: %(default)s")
    e.add_argument("--top", type=int, default=8, help="components to list (default: %(default)s)")
    e.add_argument("--out", default="report.html", help="HTML report path (default: %(default)s)")
    e.add_argument("--no-report", action="store_true",
                   help="do not write the HTML report (and compute only --level)")
    e.add_argument("--quiet", action="store_true", help="no progress bars")
    sub.add_parser("models", help="list the bundled models and their tasks")
    dataset_command.add_parser(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command is None:
        parser().print_help()
        print("\nStart with:  tl-depass explain")
        return 0
    if args.command == "dataset":
        return dataset_command.run(args)  # prints its own errors
    run = list_models if args.command == "models" else lambda: explain(args)
    return commands.report_errors("tl-depass", run, (CliError, DepassError))


def list_models() -> int:
    from tl_depass import models
    from tl_depass.models import tasks

    for name in models.names("all"):
        print(models.describe(name), end="\n\n")
    print("Tasks (tl_depass.models.tasks.generate(name, n)):")
    for name, text in tasks.TASKS.items():
        print(f"  {name:<10} {text}")
    return 0


def load_model(name: str) -> tuple[Model, str | None]:
    """(model, task name or None) for a bundled name, a path, or a TransformerLens name."""
    from tl_depass import models

    task = models.info(name).get("task") if models.pretrained.is_local(name) else None
    return models.load_any(name), task


def to_tokens(model: Model, text: str, what: str) -> Tensor:
    if not text.strip():
        raise CliError(f"the {what} is empty")
    if model.tokenizer is None:
        raise CliError(f"this model has no tokenizer, so a {what} cannot be read")
    tokens = model.to_tokens(text, truncate=False)  # TransformerLens would cut at n_ctx silently
    unknown = unknown_words(model.tokenizer, text.split())
    if unknown:
        raise CliError(f"the {what} has words that are not in the model's vocabulary: {unknown}"
                       + vocab_hint(model))
    if tokens.shape[1] > model.cfg.n_ctx:
        raise CliError(f"the {what} is {tokens.shape[1]} tokens long, more than the model's "
                       f"context of n_ctx={model.cfg.n_ctx} tokens: shorten it")
    return tokens


def vocab_hint(model: Model) -> str:
    vocab = model.tokenizer.get_vocab()
    if len(vocab) > 200:
        return ""
    words = [w for w, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    return f". The vocabulary: {' '.join(words)}"


def token_id(model: Model, text: str, what: str) -> int:
    if model.tokenizer is None:
        if text.isdigit() and int(text) < model.cfg.d_vocab:
            return int(text)
        raise CliError(f"--{what} must be a token id below {model.cfg.d_vocab} (no tokenizer)")
    ids = model.tokenizer.encode(text, add_special_tokens=False)
    tok = model.tokenizer
    if len(ids) != 1 or (tok.unk_token_id in ids and text != tok.unk_token):
        strs = [tok.decode([i]) for i in ids]
        hint = " (GPT-2-style vocabularies start words with a space: try ' word')" if len(
            model.tokenizer) > 1000 else vocab_hint(model)
        raise CliError(f"--{what} {text!r} is not one token of the model's vocabulary (it "
                       f"tokenizes to {strs}){hint}")
    return ids[0]


def read_prompt(model: Model, task: str | None, args) -> explanation.Prompt:
    """The prompt, target, wrong answer and corrupted prompt from the arguments, with the
    bundled task's first prompt filling in what is not given."""
    wrong = corrupted = None
    if args.prompt is None:
        if task is None:
            raise CliError("this model has no built-in task: pass --prompt")
        from tl_depass.models import tasks

        batch = tasks.generate(task, 1, seed=0)
        tokens, corrupted = batch.tokens[:1], batch.corrupted[:1]
        wrong = int(batch.wrong[0])
    else:
        tokens = to_tokens(model, args.prompt, "prompt")
    tokens = tokens.to(model.cfg.device)
    if args.corrupted is not None:
        corrupted = to_tokens(model, args.corrupted, "corrupted prompt")
        if corrupted.shape != tokens.shape:
            raise CliError(f"the corrupted prompt has {corrupted.shape[1]} tokens and the prompt "
                           f"{tokens.shape[1]}: activation patching needs the same length")
    with torch.no_grad():
        top = int(model(tokens)[0, -1].argmax())
    target = top if args.target is None else token_id(model, args.target, "target")
    if args.wrong is not None:
        wrong = token_id(model, args.wrong, "wrong")
        if wrong == target:
            raise CliError(f"--wrong {args.wrong!r} is the target itself: logit(target) - "
                           "logit(wrong) would be 0; pass another --wrong, or leave it out")
    if wrong == target:  # the task's wrong answer is the model's top prediction: explain the logit
        wrong = None
    return explanation.Prompt(tokens, target, wrong,
                              None if corrupted is None else corrupted.to(tokens.device))


def check_out(out: str) -> Path:
    """The report path, checked before any work: an existing folder, not a directory, never a
    symlink (the report is written to a temporary file there and renamed over it)."""
    path = Path(out)
    if path.is_symlink():
        raise CliError(f"--out {out} is a symlink: the report is never written through one; "
                       "pass the real path")
    if path.is_dir():
        raise CliError(f"--out {out} is a directory: pass a file name, e.g. {path / 'report.html'}")
    if not path.parent.is_dir():
        raise CliError(f"--out {out}: the folder {path.parent} does not exist; create it first")
    return path


def explain(args) -> int:
    out = None if args.no_report else check_out(args.out)
    model, task = load_model(args.model)
    cfg = model.cfg
    if args.level == "neurons" and cfg.attn_only:
        raise CliError(f"{args.model} is attention-only: it has no MLP neurons; use --level "
                       "tokens, heads or modules")
    if args.layer is not None and not 0 <= args.layer < cfg.n_layers:
        raise CliError(f"--layer {args.layer} is not a layer of this model (0..{cfg.n_layers - 1})")
    if args.top < 1 or args.patch_limit < 3:
        raise CliError("--top must be at least 1 and --patch-limit at least 3")
    prompt = read_prompt(model, task, args)
    levels = (args.level,) if args.no_report else explanation.LEVELS  # the report shows every level
    threads = torch.get_num_threads()
    if sum(p.numel() for p in model.parameters()) < SMALL:
        torch.set_num_threads(1)
    try:
        ex = explanation.explain(
            model, prompt,
            levels=levels, rule=args.rule, neuron_layer=args.layer, model_name=Path(args.model).stem,
            progress=not args.quiet, patch_limit=args.patch_limit)
    finally:
        torch.set_num_threads(threads)
    print(summary(ex, args.level, args.top, model))
    if not args.no_report:
        try:
            path = explanation.write_html(ex, out)
        except OSError as e:
            raise CliError(f"could not write the report to {out}: {e.strerror or e}") from None
        size = path.stat().st_size / 2**20
        print(f"\nwrote the report to {path.resolve()} ({size:.1f} MB, self-contained: open it "
              "in a browser)")
    return 0


def summary(ex: explanation.Explanation, level: str, k: int, model: Model) -> str:
    cfg = model.cfg
    kind = "attention-only" if cfg.attn_only else f"d_mlp {cfg.d_mlp}"
    lines = [f"model {ex.model_name}: {cfg.n_layers} layers, {cfg.n_heads} heads, {kind}, "
             f"d_model {cfg.d_model}; MLP rule {ex.rule}",
             f"prompt    {' '.join(ex.str_tokens)}",
             f"explains  {ex.metric_name} at the last position = {ex.metric:+.4f}"]
    lv = ex.levels[level]
    where = f" (layer {ex.neuron_layer})" if level == "neurons" else ""
    head = "    patching" if lv.patching is not None else ""
    lines += ["", f"top {level}{where}: share of the metric{head}"]
    for label, d, p in explanation.top_table(lv, k):
        tail = "" if lv.patching is None else "  (not patched)" if p is None else f"  {p:+10.4f}"
        lines.append(f"  {label:<24}{d:+10.4f}{tail}")
    lines.append(f"  {'(all components)':<24}{lv.depass.sum().item():+10.4f}" if level == "tokens"
                 else f"  (not listed: {REST[level]}, and the biases)")
    lines.append("")
    worst = max(lv.completeness.items(), key=lambda kv: kv[1])
    ok = "OK" if worst[1] <= ex.tolerance else "FAILED"
    lines.append(f"completeness ({level}): worst relative error {worst[1]:.1e} at {worst[0]} "
                 f"(tolerance {ex.tolerance:.0e}): {ok}")
    if lv.patching is None:
        lines.append("activation patching: skipped (no corrupted prompt: pass --corrupted)")
    else:
        lines.append(f"agreement with activation patching ({WHAT[level]}): {lv.agreement()}")
        lines.append(f"  corrupted prompt {' '.join(ex.corrupted)}")
    return "\n".join(lines)

