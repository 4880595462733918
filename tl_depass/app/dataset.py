"""`tl-depass dataset PROMPTS.jsonl --model NAME --level LEVEL --out DIR`: attribution over a
dataset, one JSON line per prompt (`{"prompt": ..., "target": ..., "wrong": ...}`, `wrong`
optional), to DIR/scores.parquet and DIR/meta.json (options and the batch plan). Rerunning the
same command resumes an interrupted run; under torchrun the ranks share the prompts:

    torchrun --standalone --nproc_per_node 2 -m tl_depass.app.dataset prompts.jsonl --model ioi \\
        --level heads --out runs/ioi
"""

import argparse
import json
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

from tl_depass.engine.backends import Model
from tl_depass.errors import DepassError

LEVELS = ("tokens", "heads", "modules", "neurons")
DTYPES = {"float32": torch.float32, "float64": torch.float64}


def add_parser(subparsers) -> argparse.ArgumentParser:
    d = subparsers.add_parser(
        "dataset", help="attribute every prompt of a JSONL file; write DIR/scores.parquet",
        description="Each component's share of logit(target) - logit(wrong) at the last token of "
        "every prompt of a JSONL file, written to DIR/scores.parquet (resumable; torchrun splits "
        "the prompts over ranks).")
    d.add_argument("prompts", help='a JSONL file: one {"prompt": ..., "target": ..., "wrong": ...} '
                   "per line (wrong optional)")
    d.add_argument("--model", required=True, help="a bundled model, a .json/.safetensors path or a "
                   "TransformerLens pretrained name")
    d.add_argument("--level", choices=LEVELS, required=True, help="the components")
    d.add_argument("--out", required=True, help="the run's directory (created; rerun to resume)")
    d.add_argument("--rule", choices=("softmax", "max", "ratio"), default="softmax",
                   help="how MLP activations are shared; ratio uses the backward path. "
                   "Default: %(default)s")
    d.add_argument("--method", choices=("auto", "forward", "backward"), default="auto",
                   help="auto: the backward path for --rule ratio (one forward and one "
                   "backward per batch), the forward engine otherwise; both give the same rows, "
                   "each group's rest and bias included. Default: %(default)s")
    d.add_argument("--batch-size", type=int, help="prompts per batch (default: chosen for memory)")
    d.add_argument("--layer", type=int, help="the layer whose neurons are components (--level "
                   "neurons)")
    d.add_argument("--dtype", choices=tuple(DTYPES), default="float32",
                   help="the model's dtype. Default: %(default)s")
    d.add_argument("--quiet", action="store_true", help="no progress bar")
    return d


def run(args) -> int:
    from tl_depass.app.cli import SMALL, CliError
    from tl_depass.dataset import distributed
    from tl_depass.dataset.runner import run_dataset
    from tl_depass.levels import Heads, Modules, Neurons

    with warnings.catch_warnings():  # for this command only: TL 3.x's 4.0 notice
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        try:
            if args.level == "neurons" and args.layer is None:
                raise DepassError("--level neurons needs --layer L (the layer whose neurons are "
                                  "the components)")
            if args.level != "neurons" and args.layer is not None:
                raise DepassError(f"--layer is for --level neurons; --level {args.level} takes "
                                  "every layer")
            model = load(args.model, DTYPES[args.dtype])
            prompts, targets, wrong = read_jsonl(model, Path(args.prompts))
            components = {"tokens": lambda: "tokens", "heads": Heads, "modules": Modules,
                          "neurons": lambda: Neurons(args.layer)}[args.level]()
            threads, ranks = torch.get_num_threads(), distributed.start()
            try:
                if sum(p.numel() for p in model.parameters()) < SMALL:
                    torch.set_num_threads(1)  # see tl_depass.app.cli.SMALL
                model = model.to(ranks.device)  # each rank its own GPU where there are GPUs
                table = run_dataset(model, prompts, components, answers=targets, wrong=wrong,
                                    mlp_rule=args.rule, batch_size=args.batch_size, out=args.out,
                                    method=args.method, progress=not args.quiet)
            finally:
                torch.set_num_threads(threads)
                distributed.stop(ranks)
        except (CliError, DepassError) as e:
            print(f"tl-depass: error: {e}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print(f"tl-depass: interrupted; the finished batches are kept in {args.out}: rerun "
                  "the same command to resume", file=sys.stderr)
            return 130
    if ranks.rank == 0:
        print(f"wrote {Path(args.out) / 'scores.parquet'}: {len(table)} rows, "
              f"{table['prompt'].nunique()} prompts ({args.level}, rule {args.rule})")
    return 0


def load(name: str, dtype: torch.dtype):
    """The model: a bundled name, a .json/.safetensors pair or a TransformerLens pretrained name,
    in `dtype`."""
    from tl_depass import models

    return models.load_any(name, dtype=dtype)


def read_jsonl(model: Model, path: Path) -> tuple[list[str], list[int], list[int | None]]:
    """Prompts, targets and wrong answers (None where a line has none), every line checked; a
    bad line is a DepassError naming its line number."""
    from tl_depass.dataset.runner import one_prompt

    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DepassError(f"cannot read the prompts file {path}: {e}") from None
    if not lines:
        raise DepassError(f"{path} is empty: write one JSON object per line")
    prompts, targets, wrong = [], [], []
    for n, line in enumerate(lines, 1):
        where = f"{path} line {n} (prompt {n - 1})"
        try:
            record = json.loads(line)
        except ValueError as e:
            raise DepassError(f"{where} is not JSON ({e}): write one object per line, e.g. "
                              '{"prompt": "...", "target": "...", "wrong": "..."}') from None
        if not isinstance(record, dict) or not {"prompt", "target"} <= record.keys():
            raise DepassError(f'{where}: needs an object with "prompt" and "target" (and '
                              'optionally "wrong")')
        unknown = sorted(record.keys() - {"prompt", "target", "wrong"})
        texts = [record["prompt"], record["target"], record.get("wrong", "")]
        if unknown or not all(isinstance(t, str) for t in texts):
            raise DepassError(f'{where}: "prompt", "target" and "wrong" must be strings'
                              + (f"; unknown keys {unknown}" if unknown else ""))
        try:
            item = one_prompt(model, record["prompt"], record["target"], record.get("wrong"))
        except DepassError as e:
            raise DepassError(f"{where}: {e}") from None
        prompts.append(record["prompt"])
        targets.append(item.target)
        wrong.append(item.wrong)
    return prompts, targets, wrong


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tl-depass")
    add_parser(parser.add_subparsers(dest="command", required=True))
    return run(parser.parse_args(["dataset", *(sys.argv[1:] if argv is None else argv)]))


if __name__ == "__main__":
    sys.exit(main())
