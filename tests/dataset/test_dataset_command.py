"""`tl-depass dataset`: bad lines named, an interrupted run resumed, torchrun's ranks = one process.

Runs on the bundled `ioi` model (HookedTransformer on TL 3.x, a Bridge on 4.x); the subprocess
tests kill a run after its first shard (a test hook, not a timer) and launch two gloo ranks."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from tl_depass.app import dataset as command
from tl_depass.dataset.runner import STOP_AFTER

ROOT = Path(__file__).resolve().parents[2]
LINES = [
    {"prompt": "When Paul and Lisa were at the station , Paul gave a key to", "target": "Lisa",
     "wrong": "Paul"},
    {"prompt": "When Nina and Ben went to the park , Ben gave a key to", "target": "Nina"},
    {"prompt": "Paul gave a key to", "target": "Lisa", "wrong": "Paul"},
    {"prompt": "When Lucy and Tom went to the beach , Lucy gave a ring to", "target": "Tom",
     "wrong": "Lucy"},
    {"prompt": "Paul and Lucy were at the park . Then Paul gave a book to", "target": "Lucy"},
]


def write(tmp_path, lines) -> Path:
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def cli(*argv) -> int:
    return command.main([str(a) for a in argv])


def launch(*argv, env=None, torchrun=False) -> subprocess.CompletedProcess:
    head = [sys.executable, "-m"] + (["torch.distributed.run", "--standalone", "--nproc_per_node",
                                      "2", "-m"] if torchrun else [])
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(head + ["tl_depass.app.dataset", *map(str, argv)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("line, message", [
    ({"prompt": "When Zorg and Lisa went to the park , Zorg gave a key to", "target": "Lisa"},
     "not in the tokenizer's vocabulary: \\['Zorg'"),
    ({"prompt": "When Paul and Lisa went to the park", "target": "Lisa Paul"}, "2 tokens, not one"),
    ({"prompt": "When Paul and Lisa went to the park", "target": "Lisa", "wrong": "Lisa"},
     "wrong answer is the answer"),
    ('{"prompt": "When Paul and Lisa", ', "is not JSON"),
    ({"prompt": "When Paul and Lisa"}, 'needs an object with "prompt" and "target"'),
    ({"prompt": "When Paul and Lisa", "target": 3}, "must be strings"),
])
def test_a_bad_line_is_named(tmp_path, capsys, line, message):
    path = write(tmp_path, [LINES[0], line, LINES[1]])
    assert cli(path, "--model", "ioi", "--level", "tokens", "--out", tmp_path / "run") == 1
    err = capsys.readouterr().err
    assert "line 2 (prompt 1)" in err and message.replace("\\", "") in err.replace("\\", ""), err
    assert not (tmp_path / "run").exists()  # refused before any work


def test_neurons_need_a_layer(tmp_path, capsys):
    path = write(tmp_path, LINES)
    assert cli(path, "--model", "ioi", "--level", "neurons", "--out", tmp_path / "run") == 1
    assert "--level neurons needs --layer" in capsys.readouterr().err
    assert cli(path, "--model", "ioi", "--level", "heads", "--layer", "1", "--out",
               tmp_path / "run") == 1


def test_writes_the_table_and_the_plan(tmp_path):
    path = write(tmp_path, LINES)
    assert cli(path, "--model", "ioi", "--level", "neurons", "--layer", "1", "--rule", "ratio",
               "--batch-size", "2", "--out", tmp_path / "run", "--quiet") == 0
    table = pd.read_parquet(tmp_path / "run" / "scores.parquet")
    assert {"prompt", "component", "score", "kind", "layer", "unit", "position", "has_wrong",
            "clean_metric"} <= set(table.columns)
    assert table["prompt"].unique().tolist() == list(range(len(LINES)))
    assert table.groupby("prompt")["has_wrong"].first().tolist() == ["wrong" in x for x in LINES]
    meta = json.loads((tmp_path / "run" / "meta.json").read_text())
    assert meta["batch_size"] == 2 and meta["options"]["mlp_rule"] == "ratio"
    assert sorted(i for b in meta["batches"] for i in b) == list(range(len(LINES)))
    assert meta["options"]["method"] == "backward"


def test_an_interrupted_run_resumes_to_the_same_table(tmp_path, capsys):
    path = write(tmp_path, LINES)
    args = [path, "--model", "ioi", "--level", "heads", "--batch-size", "2", "--quiet"]
    assert cli(*args, "--out", tmp_path / "whole") == 0
    killed = launch(*args, "--out", tmp_path / "run", env={STOP_AFTER: "1"})
    assert killed.returncode == -9, killed.stderr  # SIGKILL after the first shard
    assert len(list((tmp_path / "run" / "shards").glob("*.parquet"))) == 1
    assert not (tmp_path / "run" / "scores.parquet").exists()
    resumed = launch(*args, "--out", tmp_path / "run")
    assert resumed.returncode == 0, resumed.stderr
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "run" / "scores.parquet"),
                                  pd.read_parquet(tmp_path / "whole" / "scores.parquet"),
                                  check_exact=True)
    assert cli(*args, "--rule", "ratio", "--out", tmp_path / "run") == 1
    assert "holds a run with other options: method" in capsys.readouterr().err


def test_two_torchrun_ranks_write_the_single_process_table(tmp_path):
    path = write(tmp_path, LINES)
    args = [path, "--model", "ioi", "--level", "tokens", "--batch-size", "1", "--dtype", "float64",
            "--quiet"]
    assert cli(*args, "--out", tmp_path / "one") == 0
    two = launch(*args, "--out", tmp_path / "two", torchrun=True)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("wrote") == 1  # rank 0 reports
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "two" / "scores.parquet"),
                                  pd.read_parquet(tmp_path / "one" / "scores.parquet"),
                                  check_exact=True)


def test_a_rank_that_fails_stops_every_rank(tmp_path):
    """Rank 0 refuses the directory (other options); rank 1 hears of it instead of waiting."""
    path = write(tmp_path, LINES[:2])
    assert cli(path, "--model", "ioi", "--level", "tokens", "--out", tmp_path / "run", "--quiet") == 0
    two = launch(path, "--model", "ioi", "--level", "modules", "--out", tmp_path / "run", "--quiet",
                 torchrun=True)
    assert two.returncode != 0
    assert "holds a run with other options" in two.stderr and "another rank failed" in two.stderr


@pytest.mark.parametrize("rule", ["softmax", "ratio"])
def test_bundled_model_table_is_each_prompts_attribution(rule):
    """The bundled model as TransformerLens builds it (a Bridge on 4.x), float32, string prompts
    and answers, padded batches."""
    import torch

    import tl_depass

    model = tl_depass.models.load("ioi")
    prompts = [x["prompt"] for x in LINES]
    targets, wrong = [x["target"] for x in LINES], [x.get("wrong") for x in LINES]
    table = tl_depass.run_dataset(model, prompts, tl_depass.Heads(), answers=targets, wrong=wrong,
                                  mlp_rule=rule, batch_size=4, progress=False)
    for p, prompt in enumerate(prompts):
        att = tl_depass.attribute(model, prompt, tl_depass.Heads(), answer=targets[p],
                                  wrong=wrong[p], mlp_rule=rule)
        rows = table[(table["prompt"] == p) & (table["kind"] == "head")]
        torch.testing.assert_close(torch.tensor(rows["score"].to_numpy()), att.scores[0].double(),
                                   rtol=1e-4, atol=1e-5, msg=lambda m, p=p: f"prompt {p}: {m}")


def test_out_must_be_a_directory(tmp_path, capsys):
    path = write(tmp_path, LINES[:1])
    (tmp_path / "file").write_text("x")
    assert cli(path, "--model", "ioi", "--level", "tokens", "--out", tmp_path / "file") == 1
    assert "is a file: pass a directory" in capsys.readouterr().err
