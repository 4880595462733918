"""The command-line entry points (`tl_depass.commands` is what they share): each runs, and
none leaves a warning filter or a torch setting behind in the caller's process."""

import contextlib
import subprocess
import sys
import warnings

import pytest
import torch

from tl_depass import commands
from tl_depass.apd import reproduce
from tl_depass.apd.experiments import summary
from tl_depass.app import cli
from tl_depass.errors import DepassError
from tl_depass.evaluate import __main__ as evaluate
from tl_depass.models import mechanisms, train

#: (entry point, argv, exit status or result type); "--help" exits through argparse (status 0)
COMMANDS = {
    "cli models": (cli.main, ["models"], 0),
    "cli explain": (cli.main, ["explain", "--no-report", "--quiet", "--level", "heads"], 0),
    "cli explain, an error": (cli.main, ["explain", "--model", "no-such-model", "--no-report"], 1),
    "cli, no command": (cli.main, [], 0),
    "evaluate, no models": (evaluate.main, [], 2),
    "evaluate --help": (evaluate.main, ["--help"], SystemExit),
    "models.train --help": (train.main, ["--help"], SystemExit),
    "models.mechanisms --help": (mechanisms.main, ["--help"], SystemExit),
    "apd.reproduce --help": (reproduce.main, ["--help"], SystemExit),
    "apd.experiments.summary": (summary.main, None, str),
}


def torch_state() -> tuple:
    return (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(),
            torch.is_deterministic_algorithms_warn_only_enabled())


@pytest.mark.parametrize("name", COMMANDS)
def test_no_command_leaves_a_warning_filter_or_torch_setting_behind(name, tmp_path, capsys):
    """Compared after a first run: libraries a command imports on first use (transformers,
    sympy through torch) add their own filters at import time, which no command can undo."""
    main, argv, expected = COMMANDS[name]
    with contextlib.suppress(SystemExit):
        main([str(tmp_path / "first")] if argv is None else argv)
    capsys.readouterr()
    filters, state = list(warnings.filters), torch_state()
    if expected is SystemExit:
        with pytest.raises(SystemExit) as exited:
            main(argv)
        assert exited.value.code == 0
        assert "usage:" in capsys.readouterr().out
    else:
        result = main([str(tmp_path)] if argv is None else argv)
        assert isinstance(result, expected) if isinstance(expected, type) else result == expected
    assert warnings.filters == filters, "a process-wide warning filter was left behind"
    assert torch_state() == state, "torch's threads or determinism setting was left changed"


def test_torch_settings_come_back_after_an_exception():
    state = torch_state()
    with pytest.raises(RuntimeError), commands.torch_settings(threads=1, deterministic=True):
        assert torch.get_num_threads() == 1 and torch.are_deterministic_algorithms_enabled()
        raise RuntimeError("inside")
    assert torch_state() == state


def test_errors_are_one_line_with_exit_status_1(capsys):
    def fails() -> int:
        raise DepassError("the problem; the fix")

    assert commands.report_errors("prog", fails) == 1
    assert capsys.readouterr().err == "prog: error: the problem; the fix\n"
    with pytest.raises(ValueError):  # not a DepassError: a traceback, as before
        commands.report_errors("prog", lambda: int("x"))


def test_python_dash_m_commands_run_and_print_errors_as_one_line():
    def python_m(*argv: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", *argv], capture_output=True, text=True,
                              timeout=120)

    for module in ("tl_depass.evaluate", "tl_depass.models.train", "tl_depass.apd.reproduce"):
        done = python_m(module, "--help")
        assert done.returncode == 0 and "usage:" in done.stdout, done.stderr
    done = python_m("tl_depass.apd.reproduce", "no-such-experiment", "--method", "spd")
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.startswith("python -m tl_depass.apd.reproduce: error: No preset "
                                  "'no-such-experiment/spd'. Known: resid-mlp-1"), done.stderr
