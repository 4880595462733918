"""String input, labels and the default BOS rule, with a word-level tokenizer built offline."""

import pytest
import torch
from tiny import make_model
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

import tl_depass


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    words = ["<bos>", "<pad>"] + [f"w{i}" for i in range(18)]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<bos>", pad_token="<pad>",
                                   unk_token="<pad>")
    path = tmp_path_factory.mktemp("tokenizer")
    fast.save_pretrained(path)  # TransformerLens reloads tokenizers by path
    m = make_model()
    m.set_tokenizer(AutoTokenizer.from_pretrained(path), default_padding_side="right")
    return m


def test_string_prompt_labels(model):
    dec = tl_depass.decompose(model, "w1 w2 w3")
    assert dec.labels == ["tok 0 '<bos>'", "tok 1 'w1'", "tok 2 'w2'", "tok 3 'w3'", "bias"]
    score = dec.logit_attribution("w3", wrong="w4")
    logits = model("w1 w2 w3")[0, -1]
    torch.testing.assert_close(score.sum(0), (logits[5] - logits[6])[None])


def test_list_of_prompts_is_padded_and_masked(model):
    dec = tl_depass.decompose(model, ["w1 w2 w3 w4", "w5 w6"], logits="all")
    assert dec.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    alone = tl_depass.decompose(model, "w5 w6", logits="all")
    torch.testing.assert_close(dec.logits[:3, 1, :3], alone.logits[:3, 0])
    with pytest.raises(tl_depass.DepassError, match="padding"):
        dec.logit_attribution("w3")
    assert dec.logit_attribution("w3", pos=torch.tensor([4, 2])).shape == (6, 2)


def test_default_ignore_bos_uses_the_tokenizer(model):
    keep = ["blocks.1.mlp.hook_post"]
    dec = tl_depass.decompose(model, "w1 w2 w3 w4", keep=keep)
    assert (dec["blocks.1.mlp.hook_post"][0, :, 1:] == 0).all()
    off = tl_depass.decompose(model, "w1 w2 w3 w4", keep=keep, ignore_bos=False)
    assert (off["blocks.1.mlp.hook_post"][0, :, 1:] != 0).any()
