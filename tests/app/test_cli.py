"""The `tl-depass` command, in process through `main(argv)`, on the bundled models."""

import re
import shlex
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import tl_depass
from tl_depass import models, tasks
from tl_depass.app import cli
from tl_depass.app.explain import LEVELS
from tl_depass.engine.backends import hooked_class
from tl_depass.models import pretrained
from tl_depass.models.pretrained import load_pretrained, pretrained_name


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def top_lines(out: str, level: str) -> list[tuple[str, float]]:
    """The (label, DePass score) rows printed under "top <level>"."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"top {level}"))
    rows = []
    for line in lines[start + 1:]:
        m = re.fullmatch(r"  (\S.*?)\s+([+-]\d+\.\d+)(\s+[+-]\d+\.\d+)?", line)
        if not m or m.group(1).startswith("("):
            break
        rows.append((m.group(1), float(m.group(2))))
    return rows


def test_explain_with_no_arguments(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the report goes to ./report.html by default
    code, out, err = run(capsys, "explain", "--quiet")
    assert code == 0, err
    assert out.startswith("model induction:")
    batch = tasks.generate("induction", 1, seed=0)
    model = models.load("induction")
    assert f"prompt    {' '.join(model.to_str_tokens(batch.tokens[0]))}" in out
    # the trained induction model attends to the token after the earlier occurrence
    key = int(batch.key_positions[0].nonzero())
    assert top_lines(out, "tokens")[0][0].startswith(f"tok {key} ")
    assert re.search(r"completeness \(tokens\): worst relative error \S+ at \S+ \(tolerance "
                     r"1e-05\): OK", out)
    assert re.search(r"agreement with activation patching .*: Pearson -?\d\.\d\d, Spearman", out)
    html = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert html.count("class='depass-figure'") == 8  # test_explain.py lists them
    assert f"wrote the report to {tmp_path.resolve() / 'report.html'}" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html"], "a temporary file is left"


def test_out_is_checked_before_any_work_and_never_follows_a_symlink(tmp_path, capsys):
    target = tmp_path / "elsewhere.txt"
    target.write_text("keep me")
    (tmp_path / "link.html").symlink_to(target)
    for out, message in [(tmp_path / "link.html", "is a symlink"), (tmp_path, "is a directory"),
                         (tmp_path / "no" / "r.html", "does not exist")]:
        code, stdout, err = run(capsys, "explain", "--quiet", "--out", str(out))
        assert code == 1 and message in err and stdout == "", err
    assert target.read_text() == "keep me"


@pytest.mark.parametrize("level", LEVELS)
def test_each_level_matches_the_library(level, capsys):
    """The listed components and scores are DePass' own readouts for the same logit difference."""
    code, out, err = run(capsys, "explain", "--model", "recall", "--level", level, "--no-report",
                         "--quiet", "--top", "3")
    assert code == 0, err
    model = models.load("recall")
    batch = tasks.generate("recall", 1, seed=0)
    answer = int(model(batch.tokens)[0, -1].argmax())
    wrong = int(batch.wrong[0])
    if level == "neurons":  # default layer: the one whose MLP has the largest share
        modules = tl_depass.decompose(model, batch.tokens, tl_depass.Modules())
        mlp = modules.logit_attribution(answer, wrong)[:, 0].abs()
        busiest = max(range(model.cfg.n_layers), key=lambda i: mlp[modules.index(f"L{i} mlp")])
        assert f"top neurons (layer {busiest})" in out
    spec = {"tokens": "tokens", "heads": tl_depass.Heads(), "modules": tl_depass.Modules(),
            "neurons": tl_depass.Neurons(busiest) if level == "neurons" else None}[level]
    dec = tl_depass.decompose(model, batch.tokens, spec)
    scores = dec.logit_attribution(answer, wrong)[:, 0]
    keep = [i for i, label in enumerate(dec.labels) if level == "tokens" or (
        "rest" not in label and "bias" not in label)]
    order = sorted(keep, key=lambda i: -abs(scores[i].item()))[:3]
    expected = [(dec.labels[i], scores[i].item()) for i in order]
    printed = top_lines(out, level)
    assert [label for label, _ in printed] == [label for label, _ in expected]
    torch.testing.assert_close(torch.tensor([s for _, s in printed]),
                               torch.tensor([s for _, s in expected]), atol=1e-4, rtol=0)


def test_custom_prompt_target_and_corrupted(capsys):
    code, out, err = run(capsys, "explain", "--prompt", "t1 t2 t3 t4 t5 t1 t2", "--target", "t3",
                         "--wrong", "t4", "--corrupted", "t1 t2 t9 t4 t5 t1 t2", "--level",
                         "heads", "--no-report", "--quiet")
    assert code == 0, err
    assert "explains  logit('t3') - logit('t4')" in out
    assert "corrupted prompt <bos> t1 t2 t9 t4 t5 t1 t2" in out
    code, out, _ = run(capsys, "explain", "--prompt", "t1 t2 t3 t1", "--no-report", "--quiet")
    assert code == 0 and "activation patching: skipped" in out


def test_model_from_a_path_and_another_rule(capsys):
    config, _ = models.find("recall")
    code, out, err = run(capsys, "explain", "--model", str(config), "--rule", "ratio", "--level",
                         "modules", "--no-report", "--quiet")
    assert code == 0, err
    assert out.startswith("model recall:") and "MLP rule ratio" in out
    assert top_lines(out, "modules")[0][0] == "L0 mlp"  # the attribute lookup (docs/models.md)


@pytest.mark.parametrize("argv, message", [
    (["--model", "no-such-model"], "unknown model 'no-such-model'"),
    (["--target", "zebra"], "--target 'zebra' is not one token"),
    (["--prompt", " ".join(["t1"] * 40)], "n_ctx=32"),
    (["--prompt", "t1 hello t2"], "not in the model's vocabulary: ['hello']"),
    (["--prompt", "  "], "the prompt is empty"),
    (["--prompt", "t1 t2 t3", "--corrupted", "t1 t2"], "needs the same length"),
    (["--level", "neurons"], "attention-only"),
    (["--model", "recall", "--level", "neurons", "--layer", "7"], "--layer 7 is not a layer"),
    (["--prompt", "t1 t2 t3 t1", "--target", "t2", "--wrong", "t2"], "--wrong 't2' is the target"),
])
def test_errors_exit_nonzero_with_a_message(argv, message, capsys):
    code, out, err = run(capsys, "explain", "--no-report", "--quiet", *argv)
    assert code == 1
    assert err.startswith("tl-depass: error: ") and message in err
    assert "Traceback" not in err


#: the README's pretrained example, word for word
README_GPT2 = ["explain", "--model", "gpt2", "--prompt",
               "When Mary and John went to the store, John gave a drink to",
               "--target", " Mary", "--wrong", " John"]
#: the id TransformerLens loads GPT-2 under: its official name on 3.x, the Hugging Face id on 4.x
GPT2 = "gpt2" if hooked_class() is not None else "openai-community/gpt2"


@pytest.mark.parametrize("name", ["gpt2", "GPT2", "gpt2-small", "openai-community/gpt2"])
def test_short_names_and_hub_ids_resolve_to_one_model(name):
    assert pretrained_name(name) == GPT2
    assert pretrained_name("pythia-70m") == "EleutherAI/pythia-70m"
    assert pretrained_name("no-such-model-xyz") is None


def test_pretrained_names_need_network(capsys, monkeypatch):
    monkeypatch.setattr(pretrained, "hub_reachable", lambda timeout=3.0: False)  # never download here
    code, _, err = run(capsys, *README_GPT2, "--no-report")
    assert code == 1 and "Hugging Face hub" in err and "no network" in err, err

    asked = []

    def offline(name, **settings):
        asked.append(name)
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(pretrained, "hub_reachable", lambda timeout=3.0: True)
    monkeypatch.setattr(pretrained, "load_pretrained", offline)
    code, _, err = run(capsys, *README_GPT2, "--no-report")
    assert code == 1 and "needs network access" in err and "OSError" in err
    assert asked == [GPT2]


@pytest.mark.skipif(hooked_class() is None, reason="TL 4 never turns trust_remote_code on unasked")
def test_models_that_would_run_hub_code_are_refused(capsys, monkeypatch):
    """TransformerLens 3.x loads some official models with trust_remote_code=True by itself."""
    monkeypatch.setattr(pretrained, "hub_reachable", lambda timeout=3.0: True)
    monkeypatch.setattr(pretrained, "load_pretrained", lambda name, **kw: pytest.fail("must not load"))
    for name in ("bigcode/santacoder", "microsoft/phi-2"):
        code, _, err = run(capsys, "explain", "--model", name, "--no-report")
        assert code == 1 and "trust_remote_code" in err and "never" in err, err
    with pytest.raises(tl_depass.DepassError, match="trust_remote_code"):
        load_pretrained("microsoft/phi-2")


def test_unknown_pretrained_name_is_a_clear_error(capsys):
    code, _, err = run(capsys, "explain", "--model", "no-such-model-xyz", "--no-report")
    assert code == 1 and "unknown model 'no-such-model-xyz'" in err and "gpt2" in err


def test_models_lists_bundled_models_and_tasks(capsys):
    code, out, _ = run(capsys, "models")
    assert code == 0
    for name in models.names():
        assert models.describe(name) in out
    for name in tasks.TASKS:
        assert re.search(rf"^  {name}\s+{re.escape(tasks.TASKS[name])}$", out, re.M)


def test_python_dash_m_is_the_command():
    done = subprocess.run([sys.executable, "-m", "tl_depass", "models"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert all(name in done.stdout for name in ["induction", "recall", "ioi"])
    bare = subprocess.run([sys.executable, "-m", "tl_depass"], capture_output=True, text=True,
                          timeout=120)
    assert bare.returncode == 0 and "tl-depass explain" in bare.stdout


def test_neuron_patching_is_sampled_above_the_limit(capsys):
    code, out, err = run(capsys, "explain", "--model", "recall", "--level", "neurons",
                         "--patch-limit", "50", "--no-report", "--quiet")
    assert code == 0, err
    assert "(over 50 of 256 neurons, sampled at random)" in out
    assert "not patched" not in out  # the listed top neurons are always patched


def readme_commands() -> list[tuple[str, bool]]:
    """The `tl-depass ...` lines of the README's command block, and whether each needs network."""
    readme = (Path(__file__).parents[2] / "README.md").read_text(encoding="utf-8")
    block = readme.split("## The `tl-depass` command", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    lines = [line.partition("#") for line in block.splitlines() if line.startswith("tl-depass ")]
    return [(command.strip(), "network" in comment) for command, _, comment in lines]


@pytest.mark.parametrize("command, network", readme_commands(), ids=lambda c: str(c)[:60])
def test_every_readme_command_runs(command, network, tmp_path, capsys, monkeypatch):
    """Word for word, on this TransformerLens (a Bridge on 4.x); the one that needs network stops
    at the offline check (test_pretrained_names_need_network covers what follows)."""
    monkeypatch.chdir(tmp_path)
    argv = shlex.split(command)[1:]
    if network:
        monkeypatch.setattr(pretrained, "hub_reachable", lambda timeout=3.0: False)
    code, out, err = run(capsys, *argv, *(["--quiet"] if argv[0] == "explain" else []))
    if network:
        assert code == 1 and "no network" in err, err
        return
    assert code == 0, err
    if "--out" in argv:
        assert (tmp_path / argv[argv.index("--out") + 1]).stat().st_size > 0
    elif argv[0] == "explain":
        assert (tmp_path / "report.html").stat().st_size > 0


def test_the_command_leaves_the_callers_warning_filters_alone(capsys):
    before = list(warnings.filters)
    run(capsys, "models")
    assert warnings.filters == before
