"""run_dataset's table is attribute's / decompose's per-prompt shares, whatever the batching."""

import pandas as pd
import pytest
import torch

import tl_depass
from tl_depass import DepassError, Heads, Modules, Neurons
from tl_depass.dataset import deletion_curves, run_dataset, summary, top_components
from tl_depass.evaluate import tokens as token_eval

tiny = pytest.importorskip("tiny")

LENGTHS = [5, 7, 7, 4, 6, 7]
ANSWERS = [3, 4, 5, 6, 7, 8]
WRONG = [1, None, 2, None, 9, 0]
LEVELS = ["tokens", Heads(), Modules(), Neurons(1, [0, 3, 5])]


@pytest.fixture(scope="module")
def model():
    return tiny.make_model()


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, 20, (n,), generator=g) for n in LENGTHS]


def run(model, prompts, components, rule, **kw):
    return run_dataset(model, prompts, components, answers=ANSWERS, wrong=WRONG, mlp_rule=rule,
                       progress=False, **kw)


@pytest.mark.parametrize("rule", ["softmax", "ratio"])
@pytest.mark.parametrize("components", LEVELS, ids=["tokens", "heads", "modules", "neurons"])
def test_table_is_each_prompts_attribution(model, prompts, components, rule):
    table = run(model, prompts, components, rule, batch_size=3)
    assert table["prompt"].is_monotonic_increasing
    for p, ids in enumerate(prompts):
        rows = table[table["prompt"] == p]
        att = tl_depass.attribute(model, ids[None], components, answer=ANSWERS[p], wrong=WRONG[p],
                                  mlp_rule=rule)
        named = rows[~rows["kind"].isin(["rest", "bias"])]
        tiny.close(torch.tensor(named["score"].to_numpy()), att.scores[0].double(), f"prompt {p}")
        dec = tl_depass.decompose(model, ids[None], components, mlp_rule=rule)
        clean = dec.clean_logits[0, -1]
        metric = clean[ANSWERS[p]] - (0 if WRONG[p] is None else clean[WRONG[p]])
        tiny.close(torch.tensor(rows["clean_metric"].to_numpy()),
                   metric.expand(len(rows)).double(), "clean metric")
        tiny.close(torch.tensor(rows["score"].sum()), metric.double() * (rows["group"].max() + 1),
                   "each group's rows sum to the metric")
        assert (rows["has_wrong"] == (WRONG[p] is not None)).all()
        # both paths: rest and bias exactly as decompose has them
        full = dec.logit_attribution(ANSWERS[p], WRONG[p])[:, 0]
        tiny.close(torch.tensor(rows["score"].to_numpy()), full.double(), "rest and bias")
        assert len(rows) == len(dec.labels)
        assert rows["kind"].tolist() == [x.kind for x in dec.component_labels]
        if components != "tokens":
            assert rows["component"].tolist() == dec.labels


@pytest.mark.parametrize("components", LEVELS, ids=["tokens", "heads", "modules", "neurons"])
def test_backward_and_forward_tables_have_the_same_rows(model, prompts, components):
    """Under the ratio rule the backward path gives each group's rest and bias as rows of their
    own, as the forward path does: the same components, the same scores to rounding."""
    back = run(model, prompts, components, "ratio")
    fwd = run(model, prompts, components, "ratio", method="forward")
    kinds = {"bias"} if components == "tokens" else {"rest", "bias"}  # tokens: no rest
    assert set(back["kind"]) & {"rest", "bias"} == kinds
    pd.testing.assert_frame_equal(fwd.drop(columns=["score", "clean_metric"]),
                                  back.drop(columns=["score", "clean_metric"]))
    for column in ("score", "clean_metric"):
        tiny.close(torch.tensor(back[column].to_numpy()), torch.tensor(fwd[column].to_numpy()),
                   f"{column}: backward vs forward")
    with pytest.raises(DepassError, match="needs method='forward'"):
        run(model, prompts, components, "softmax", method="backward")


def test_one_forward_fewer(model, prompts):
    """The backward path's clean metric comes from the forward attribute runs: one forward per
    batch (the frozen forward computes the clean values; no separate clean run, no third one for
    the metric), and the metric is bit for bit the one the
    runner's own clean forward used to read (`unembed.hook_out` at the last token)."""
    calls = []
    handle = model.register_forward_hook(lambda module, args, out: calls.append(1))
    try:
        table = run(model, prompts, Heads(), "ratio", batch_size=1)  # no padding: the same input
    finally:
        handle.remove()
    assert len(calls) == len(prompts)  # one batch per prompt, one forward per batch
    got = {}

    def keep(x, hook):
        got["x"] = x

    for p, ids in enumerate(prompts):
        with torch.no_grad(), model.hooks(fwd_hooks=[("unembed.hook_out", keep)]):
            model(ids[None])
        last = got.pop("x")[0, -1]
        metric = last[ANSWERS[p]] - (0 if WRONG[p] is None else last[WRONG[p]])
        clean = table[table["prompt"] == p]["clean_metric"].unique()
        assert len(clean) == 1 and clean[0] == metric.item(), (p, clean, metric)


def test_structured_columns(model, prompts):
    tokens = run(model, prompts, "tokens", "softmax")
    first = tokens[tokens["prompt"] == 0]
    assert first["component"].tolist() == [f"tok {p}" for p in range(LENGTHS[0])] + ["bias"]
    assert first["position"].tolist()[:-1] == list(range(LENGTHS[0]))
    assert first["kind"].tolist() == ["token"] * LENGTHS[0] + ["bias"]
    heads = run(model, prompts, Heads(), "ratio")
    h = heads[(heads["prompt"] == 1) & (heads["kind"] == "head")]
    assert list(zip(h["layer"], h["unit"], strict=True)) == [(layer, u) for layer in range(2)
                                                             for u in range(4)]
    rest = heads[(heads["prompt"] == 1) & heads["kind"].isin(["rest", "bias"])]
    assert list(zip(rest["component"], rest["kind"], rest["layer"], strict=True)) == [
        ("L0 rest", "rest", 0), ("L0 bias", "bias", 0), ("L1 rest", "rest", 1), ("L1 bias", "bias", 1)]


@pytest.mark.parametrize("rule", ["softmax", "ratio"])
def test_batch_size_and_padding_do_not_change_the_table(model, prompts, rule):
    one = run(model, prompts, Heads(), rule, batch_size=1)  # no padding at all
    for size in (2, 6, None):
        other = run(model, prompts, Heads(), rule, batch_size=size)
        pd.testing.assert_frame_equal(one.drop(columns=["score", "clean_metric"]),
                                      other.drop(columns=["score", "clean_metric"]))
        for column in ("score", "clean_metric"):
            tiny.close(torch.tensor(other[column].to_numpy()), torch.tensor(one[column].to_numpy()),
                       f"{column}, batch size {size}")


def test_out_writes_shards_and_resumes_from_them(model, prompts, tmp_path):
    table = run(model, prompts, "tokens", "softmax", batch_size=2, out=tmp_path)
    pd.testing.assert_frame_equal(table, pd.read_parquet(tmp_path / "scores.parquet"))
    pd.testing.assert_frame_equal(table, run(model, prompts, "tokens", "softmax", batch_size=2),
                                  check_exact=True)  # in memory: the same table
    shards = sorted((tmp_path / "shards").iterdir())
    assert len(shards) == 3
    shards[1].unlink()  # as if the run had stopped before this batch
    (tmp_path / "scores.parquet").unlink()
    again = run(model, prompts, "tokens", "softmax", out=tmp_path)  # the recorded plan: size 2
    pd.testing.assert_frame_equal(again, table, check_exact=True)


def test_other_options_into_the_same_directory_are_refused(model, prompts, tmp_path):
    run(model, prompts, Heads(), "softmax", batch_size=2, out=tmp_path)
    for kw, what in [({"rule": "ratio"}, "mlp_rule"), ({"components": Modules()}, "components"),
                     ({"batch_size": 3}, "batch_size")]:
        args = {"components": Heads(), "rule": "softmax", "batch_size": 2, **kw}
        with pytest.raises(DepassError, match=f"other options: .*{what}.*another --out"):
            run(model, prompts, args.pop("components"), args.pop("rule"), out=tmp_path, **args)
    with pytest.raises(DepassError, match="data_sha256"):
        run_dataset(model, prompts[::-1], Heads(), answers=ANSWERS, wrong=WRONG, out=tmp_path,
                    progress=False)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(DepassError, match="not empty"):
        run(model, prompts, Heads(), "softmax", out=tmp_path / "other")


def test_bad_input_names_the_prompt(model, prompts):
    with pytest.raises(DepassError, match="prompt 2: .*wrong answer is the answer"):
        run_dataset(model, prompts, answers=ANSWERS, wrong=[None, None, 5, None, None, None])
    with pytest.raises(DepassError, match="prompt 1: .*token id"):
        run_dataset(model, prompts, answers=[3, 99, 3, 3, 3, 3])
    with pytest.raises(DepassError, match="6 prompts but 2 answers"):
        run_dataset(model, prompts, answers=[3, 4])
    with pytest.raises(DepassError, match="batch_size"):
        run_dataset(model, prompts, answers=ANSWERS, batch_size=0)
    with pytest.raises(DepassError, match="run_dataset takes"):
        run_dataset(model, prompts, tl_depass.Subspace("blocks.1.hook_resid_pre",
                                                       torch.randn(16, 2)), answers=ANSWERS)


def test_aggregates(model, prompts):
    table = run(model, prompts, "tokens", "softmax")
    stats = summary(table)
    tok1 = table[table["component"] == "tok 1"]["score"]
    row = stats[stats["component"] == "tok 1"].iloc[0]
    assert row["mean"] == pytest.approx(tok1.mean()) and row["median"] == pytest.approx(tok1.median())
    assert row["prompts"] == len(prompts)
    assert stats[stats["component"] == "tok 6"].iloc[0]["prompts"] == 3  # three prompts of 7
    top = top_components(table, k=3)
    assert top["mean"].is_monotonic_decreasing and len(top) == 3 and "bias" not in set(top["kind"])
    curves = deletion_curves(model, table, prompts, ANSWERS, percents=(50, 100))
    for p, ids in enumerate(prompts):  # the one implementation, prompt by prompt
        scores = torch.tensor(table[(table["prompt"] == p) & (table["kind"] == "token")]["score"]
                              .to_numpy())
        one = token_eval.deletion_curves(model, ids[None], torch.tensor([ANSWERS[p]]), scores[None],
                                         (50, 100))
        for mode in ("disrupt", "recover"):
            torch.testing.assert_close(curves[mode][:, p], one[mode][:, 0])
    assert set(token_eval.summarise(curves)) >= {"disrupt_aopc", "recover_aopc"}
    with pytest.raises(DepassError, match="token-level table"):
        deletion_curves(model, run(model, prompts, Heads(), "ratio"), prompts, ANSWERS)


@pytest.mark.parametrize("rule", ["softmax", "ratio"])
def test_the_model_is_left_as_found(model, prompts, rule):
    weights = {n: p.detach().clone() for n, p in model.state_dict().items()}
    run(model, prompts, Heads(), rule, batch_size=4)
    assert sum(len(m._forward_hooks) + len(m._backward_hooks) for m in model.modules()) == 0
    for n, p in model.state_dict().items():
        assert torch.equal(p, weights[n]), f"parameter {n} changed"


@pytest.mark.parametrize("rule", ["softmax", "ratio"])
def test_softcapped_metric_is_the_pre_softcap_logit_difference(prompts, rule):
    capped = tiny.make_model(output_logits_soft_cap=1.0)
    table = run(capped, prompts, "tokens", rule, batch_size=4)
    for p, ids in enumerate(prompts):
        rows = table[table["prompt"] == p]
        dec = tl_depass.decompose(capped, ids[None], mlp_rule=rule)
        logits = dec.logits.sum(0)[0]  # the sum of the shares (last token): before the softcap
        metric = logits[ANSWERS[p]] - (0 if WRONG[p] is None else logits[WRONG[p]])
        tiny.close(torch.tensor(rows["clean_metric"].iloc[0]), metric.double(), f"prompt {p}")
        tiny.close(torch.tensor(rows["score"].sum()), metric.double(), f"prompt {p}: the rows")


def test_the_memory_estimate_picks_the_batch_size(model, prompts, tmp_path, monkeypatch):
    import json

    from tl_depass import memory

    one = tl_depass.estimate_memory(model, torch.zeros(1, max(LENGTHS), dtype=torch.long), Heads(),
                                    keep=[], logits="last").total
    # plenty: the largest power of two <= 6 prompts; 3x one prompt's estimate: one at a time
    for free, size in [(2**40, 4), (3 * one, 1)]:
        monkeypatch.setattr(memory, "available_memory", lambda device, free=free: free)
        out = tmp_path / str(size)
        run(model, prompts, Heads(), "softmax", out=out)
        meta = json.loads((out / "meta.json").read_text())
        assert meta["batch_size"] == size
        assert max(map(len, meta["batches"])) == size
