"""Saving and loading results: a directory of safetensors and JSON (no pickle), loaded back
without the model, bit for bit, with every readout that needs only saved data working offline."""

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

import tl_depass
from tl_depass import Attribution, Decomposition, DepassError
from tl_depass.engine.backends import bridge_class, hooked_class
from tl_depass.saving import FORMAT_VERSION, JSON, TENSORS


def same(actual, expected, what: str) -> None:
    """Bit-for-bit equal (dtype and device too), or both None; the message names `what`."""
    if expected is None:
        assert actual is None, f"{what}: expected None, got a tensor"
        return
    torch.testing.assert_close(actual, expected, rtol=0, atol=0, equal_nan=True,
                               msg=lambda m: f"{what}: {m}")


def ht_case(case: str):
    models = pytest.importorskip("tiny")  # skips on TransformerLens 4.x (no HookedTransformer)
    model = models.make_model()
    tokens = models.random_tokens(model, batch=2, pos=6)
    if case == "tokens":
        return model, tl_depass.decompose(model, tokens), -1
    if case == "tokens all":  # every position's logits, [component, batch, pos, d_vocab]
        return model, tl_depass.decompose(model, tokens, logits="all"), -1
    if case == "heads":
        return model, tl_depass.decompose(model, tokens, tl_depass.Heads(), mlp_rule="ratio"), -1
    if case == "neurons":
        return model, tl_depass.decompose(model, tokens, tl_depass.Neurons(1, [0, 3, 5])), -1
    mask = torch.ones_like(tokens)
    mask[1, 4:] = 0  # right padding
    dec = tl_depass.decompose(model, tokens.masked_fill(mask == 0, 0), attention_mask=mask)
    return model, dec, torch.tensor([5, 3])


def bridge_case(case: str):
    if bridge_class() is None:
        pytest.skip("this transformer_lens has no TransformerBridge")
    from bridges import make_bridge

    bridge, _ = make_bridge("GPT2LMHeadModel")
    tokens = torch.randint(0, 61, (2, 6), generator=torch.Generator().manual_seed(1))
    if case == "bridge model":
        return bridge, None, None
    if case == "bridge heads":
        dec = tl_depass.decompose(bridge, tokens, tl_depass.Heads(),
                                  keep=["blocks.1.hook_in", "blocks.0.mlp.out.hook_in"])
        return bridge, dec, -1
    mask = torch.ones_like(tokens)
    mask[0, 3:] = 0
    return bridge, tl_depass.decompose(bridge, tokens, attention_mask=mask), torch.tensor([2, 5])


def small_model():
    """A tiny HookedTransformer, or on TransformerLens 4.x a tiny Bridge, and 2 x 6 tokens."""
    if hooked_class() is None:
        model = bridge_case("bridge model")[0]
        return model, torch.randint(0, 61, (2, 6), generator=torch.Generator().manual_seed(1))
    models = pytest.importorskip("tiny")
    model = models.make_model()
    return model, models.random_tokens(model, batch=2, pos=6)


def saved_padded(path: Path) -> Decomposition:
    model, tokens = small_model()
    mask = torch.ones_like(tokens)
    mask[1, 4:] = 0
    dec = tl_depass.decompose(model, tokens, attention_mask=mask)
    dec.save(path)
    return dec


CASES = ["tokens", "tokens all", "heads", "neurons", "padded", "bridge heads", "bridge padded"]


@pytest.fixture(params=CASES)
def saved(request, tmp_path):
    model, dec, pos = (bridge_case if request.param.startswith("bridge") else ht_case)(request.param)
    dec.save(tmp_path / "dec")
    return request.param, model, dec, pos, Decomposition.load(tmp_path / "dec")


def test_round_trip_is_bit_for_bit(saved):
    case, _, dec, _, loaded = saved
    assert loaded.labels == dec.labels and loaded.groups == dec.groups, case
    assert loaded.component_labels == dec.component_labels, case
    assert list(loaded.results) == list(dec.results) and list(loaded.clean) == list(dec.clean)
    for name in dec.results:
        same(loaded.results[name], dec.results[name], f"{case}: results {name}")
    for name in dec.clean:
        same(loaded.clean[name], dec.clean[name], f"{case}: clean {name}")
    same(loaded.tokens, dec.tokens, f"{case}: tokens")
    same(loaded.attention_mask, dec.attention_mask, f"{case}: attention_mask")
    same(loaded.clean_logits, dec.clean_logits, f"{case}: clean_logits")
    assert loaded.model.cfg.d_vocab == dec.model.cfg.d_vocab, case


def test_readouts_work_offline(saved):
    case, model, dec, pos, loaded = saved
    assert loaded.model.tokenizer is None and isinstance(loaded.model, tl_depass.saving.SavedModel)
    answer, wrong = 3, torch.tensor([4, 7])
    same(loaded.logits, dec.logits, f"{case}: logits")
    same(loaded.logit_attribution(answer, wrong, pos), dec.logit_attribution(answer, wrong, pos),
         f"{case}: logit_attribution")
    assert loaded.completeness_error() == dec.completeness_error(), case
    pd.testing.assert_frame_equal(loaded.to_frame(pos=pos), dec.to_frame(pos=pos))
    live_top, offline_top = dec.top_tokens(0, k=3), loaded.top_tokens(0, k=3)
    assert [s for _, s in offline_top] == [s for _, s in live_top], case
    assert [n for n, _ in offline_top] == [f"[{i}]" for i in
                                          (dec.logits[0, 0, -1] if dec.logit_positions is None
                                           else dec.logits[0, 0]).topk(3).indices.tolist()], case
    assert loaded.logits_kept == dec.logits_kept == ("all" if case == "tokens all" else "last")
    same(loaded.logit_positions, dec.logit_positions, f"{case}: logit_positions")
    if "heads" in case:
        same(loaded.head_scores(answer, wrong), dec.head_scores(answer, wrong), f"{case}: heads")
    if case == "neurons":
        same(loaded.neuron_scores(answer, wrong), dec.neuron_scores(answer, wrong), case)
    if case == "bridge heads":  # a Bridge's raw name of a kept hook still resolves offline
        same(loaded["blocks.1.hook_in"], dec["blocks.1.hook_resid_pre"], f"{case}: alias")
    for name in dec.results:
        same(loaded[name], dec[name], f"{case}: dec[{name!r}]")


def test_structured_labels_round_trip_and_old_files_load(tmp_path):
    model, tokens = small_model()
    dec = tl_depass.decompose(model, tokens, tl_depass.Heads(), keep=[])
    assert {x.kind for x in dec.component_labels} == {"rest", "head", "bias"}
    dec.save(tmp_path / "dec")
    loaded = Decomposition.load(tmp_path / "dec")
    assert loaded.component_labels == dec.component_labels
    pd.testing.assert_frame_equal(loaded.to_frame(), dec.to_frame())
    # a file saved before structured labels existed: display strings only
    meta = json.loads((tmp_path / "dec" / JSON).read_text())
    del meta["component_labels"]
    (tmp_path / "dec" / JSON).write_text(json.dumps(meta))
    old = Decomposition.load(tmp_path / "dec")
    assert old.labels == dec.labels and old.groups == dec.groups
    assert [(x.name, x.kind, x.group) for x in old.component_labels] == [
        (x.name, "unknown", x.group) for x in dec.component_labels]
    same(old.logit_attribution(3), dec.logit_attribution(3), "old file: logit_attribution")
    with pytest.raises(DepassError, match="older tl_depass.*decompose again"):
        old.head_scores(3)


def test_string_answer_offline_asks_for_token_ids(tmp_path):
    saved_padded(tmp_path / "dec")
    loaded = Decomposition.load(tmp_path / "dec")
    for answer in (" the", [3, " the"]):
        with pytest.raises(DepassError, match="without its model.*pass token ids"):
            loaded.logit_attribution(answer, pos=torch.tensor([5, 3]))


def test_format_version_mismatch_is_refused(tmp_path):
    saved_padded(tmp_path / "dec")
    file = tmp_path / "dec" / JSON
    record = json.loads(file.read_text())
    record["format_version"] = FORMAT_VERSION + 98
    file.write_text(json.dumps(record))
    with pytest.raises(DepassError, match=rf"{JSON}.*version {FORMAT_VERSION + 98}.*reads version "
                                          rf"{FORMAT_VERSION}"):
        Decomposition.load(tmp_path / "dec")


def test_damaged_or_missing_files_name_the_file(tmp_path):
    saved_padded(tmp_path / "dec")
    tensors = tmp_path / "dec" / TENSORS
    tensors.write_bytes(tensors.read_bytes()[:200])
    with pytest.raises(DepassError, match=f"{TENSORS}.*corrupted or truncated"):
        Decomposition.load(tmp_path / "dec")
    tensors.unlink()
    with pytest.raises(DepassError, match=TENSORS):
        Decomposition.load(tmp_path / "dec")
    (tmp_path / "dec" / JSON).write_text("{not json")
    with pytest.raises(DepassError, match=f"{JSON}.*not valid JSON"):
        Decomposition.load(tmp_path / "dec")
    with pytest.raises(DepassError, match="not a directory"):
        Decomposition.load(tmp_path / "nothing here")


def test_overwrite_only_a_saved_result_and_only_when_asked(tmp_path):
    dec = saved_padded(tmp_path / "dec")
    with pytest.raises(DepassError, match="already holds a saved result.*overwrite=True"):
        dec.save(tmp_path / "dec")
    dec.save(tmp_path / "dec", overwrite=True)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(DepassError, match="not empty"):
        dec.save(tmp_path / "other", overwrite=True)
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"
    with pytest.raises(DepassError, match="Decomposition.load"):
        Attribution.load(tmp_path / "dec")


def test_no_pickle_only_safetensors_and_json(tmp_path):
    saved_padded(tmp_path / "dec")
    files = sorted(p.name for p in Path(tmp_path / "dec").iterdir())
    assert files == sorted([JSON, TENSORS]), files
    assert not [p for p in tmp_path.rglob("*") if p.suffix in (".pt", ".pkl", ".pickle", ".bin")]
    assert json.loads((tmp_path / "dec" / JSON).read_text())["absent"] == []


def test_attribution_round_trip_and_load_results(tmp_path):
    model, tokens = small_model()
    attr = tl_depass.attribute(model, tokens, tl_depass.Heads(), answer=3, wrong=4, mlp_rule="ratio")
    attr.save(tmp_path / "attr")
    loaded = Attribution.load(tmp_path / "attr")
    assert loaded.labels == attr.labels and loaded.method == attr.method
    same(loaded.scores, attr.scores, "Attribution.scores")
    pd.testing.assert_frame_equal(loaded.to_frame(), attr.to_frame())
    again = tl_depass.load_results(tmp_path / "attr")
    assert isinstance(again, Attribution)
    same(again.scores, attr.scores, "load_results")
    with pytest.raises(DepassError, match="Attribution.load"):
        Decomposition.load(tmp_path / "attr")


def test_to_cpu_returns_a_copy(tmp_path):
    dec = saved_padded(tmp_path / "dec")
    moved = dec.to("cpu")
    assert moved is not dec and moved.model is dec.model and moved.labels == dec.labels
    moved.results.pop("logits")
    assert "logits" in dec.results  # the copy's containers are its own
    for name, value in dec.results.items():
        if name in moved.results:
            same(moved.results[name], value, f"to: {name}")
    same(dec.cpu().attention_mask, dec.attention_mask, "cpu: attention_mask")
    attr = Attribution(["a", "b"], torch.ones(1, 2, dtype=torch.float64), "backward")
    copied = attr.cpu()
    assert copied is not attr and copied.labels == attr.labels
    same(copied.scores, attr.scores, "Attribution.cpu")


def test_token_strings_are_saved_with_a_tokenizer(tmp_path):
    """With a tokenizer the token strings are saved; a string answer live equals its id offline."""
    models = pytest.importorskip("tiny")
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    words = ["<bos>", "<pad>"] + [f"w{i}" for i in range(18)]  # as in test_tokenizer.py
    core = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<bos>", pad_token="<pad>",
                            unk_token="<pad>").save_pretrained(tmp_path / "tokenizer")
    model = models.make_model()
    model.set_tokenizer(AutoTokenizer.from_pretrained(tmp_path / "tokenizer"),
                        default_padding_side="right")
    dec = tl_depass.decompose(model, ["w1 w2 w3", "w4 w5"])
    dec.save(tmp_path / "dec")
    loaded = Decomposition.load(tmp_path / "dec")
    assert loaded.str_tokens == [list(model.to_str_tokens(row)) for row in dec.tokens]
    pos = dec.attention_mask.sum(1) - 1
    same(loaded.logit_attribution(model.to_single_token("w7"), pos=pos),
         dec.logit_attribution("w7", pos=pos), "string answer live, its id offline")
