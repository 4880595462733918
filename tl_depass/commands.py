"""What the command-line entry points share (`tl-depass`, `python -m tl_depass.evaluate`,
`python -m tl_depass.models.train`, `python -m tl_depass.apd.reproduce`, ...): the options they
have in common, torch settings that last for one command only, and a DepassError printed as one
line (`<prog>: error: ...`, exit status 1) instead of a traceback."""

import argparse
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import NoReturn

import torch

from tl_depass.errors import DepassError


def description(doc: str) -> str:
    """The first paragraph of a module's docstring, for `ArgumentParser(description=...)`."""
    return doc.split("\n\n")[0]


def add_threads(p: argparse.ArgumentParser, help: str | None = None) -> None:
    p.add_argument("--threads", type=int, default=1, help=help)


def add_seed(p: argparse.ArgumentParser, help: str | None = None) -> None:
    p.add_argument("--seed", type=int, default=0, help=help)


@contextmanager
def torch_settings(threads: int | None = None, deterministic: bool = False) -> Iterator[None]:
    """Inside: torch uses `threads` CPU threads (None: as it is) and, if `deterministic`,
    deterministic algorithms. The caller's settings come back on exit, also after an exception,
    so calling a command's `main(argv)` in process leaves the process as it found it."""
    before = torch.get_num_threads()
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    if threads is not None:
        torch.set_num_threads(threads)
    if deterministic:
        torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.set_num_threads(before)
        if deterministic:
            torch.use_deterministic_algorithms(was_deterministic, warn_only=warn_only)


def report_errors(prog: str, run: Callable[[], int],
                  errors: tuple[type[Exception], ...] = (DepassError,)) -> int:
    """`run()`'s exit status; one of `errors` is printed as `<prog>: error: <message>` on stderr
    and gives exit status 1 (the messages name the problem and the fix: a traceback adds nothing)."""
    try:
        return run()
    except errors as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1


def run_command(prog: str, main: Callable[[], object],
                errors: tuple[type[Exception], ...] = (DepassError,)) -> NoReturn:
    """Run `main` as a process's command: its int result is the exit status (anything else
    returned: 0); one of `errors` a one-line message and exit status 1."""
    def status() -> int:
        result = main()
        return result if isinstance(result, int) and not isinstance(result, bool) else 0

    sys.exit(report_errors(prog, status, errors))
