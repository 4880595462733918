"""The bundled text model `pystdlib` (trained on the Python standard library; docs/models.md):
it loads on both backends with its byte-level BPE tokenizer, the tokenizer round-trips code, its
loss on held-out code is below the bound measured at training time, its model JSON passes only
through the allow-list, and DePass finds the mechanisms documented for it, each checked by an
intervention. No test trains it."""

import json
import shutil

import pytest
import torch
import torch.nn.functional as F

import tl_depass
from tl_depass import models
from tl_depass.engine.backends import hooked_class, native_bridge
from tl_depass.models import text_mechanisms, text_probes

HOOKED = hooked_class() is not None
needs_hooked = pytest.mark.skipif(not HOOKED, reason="needs HookedTransformer (TransformerLens 3.x)")
needs_model = pytest.mark.skipif(not (HOOKED or native_bridge() is not None),
                                 reason="needs HookedTransformer (TL 3.x) or a TL-native Bridge (TL 4.x)")

# Held-out code (files the model never saw in training: corpus.held_out), as written in CPython
# 3.11's Lib/functools.py, Lib/traceback.py and Lib/chunk.py.
HELD_OUT = [
    '''def _lt_from_gt(self, other):
    'Return a < b.  Computed by @total_ordering from (not a > b) and (a != b).'
    op_result = type(self).__gt__(self, other)
    if op_result is NotImplemented:
        return op_result
    return not op_result and self != other
''',
    '''def format_exception_only(exc, /, value=_sentinel):
    """Format the exception part of a traceback.

    The return value is a list of strings, each ending in a newline.
    """
    if value is _sentinel:
        value = exc
    te = TracebackException(type(value), value, None, compact=True)
    return list(te.format_exception_only())
''',
    '''    def read(self, size=-1):
        """Read at most size bytes from the chunk.
        If size is omitted or negative, read until the end
        of the chunk.
        """

        if self.closed:
            raise ValueError("I/O operation on closed file")
        if self.size_read >= self.chunksize:
            return b''
        if size < 0:
            size = self.chunksize - self.size_read
        data = self.file.read(size)
        return data
''',
]
LOSS_BOUND = 3.8  # nats/token, mean over HELD_OUT; measured 3.50 (both backends; docs/models.md)


@pytest.fixture(scope="module")
def model():
    if not (HOOKED or native_bridge() is not None):
        pytest.skip("needs HookedTransformer (TL 3.x) or a TL-native Bridge (TL 4.x)")
    return models.load("pystdlib")


def test_names_and_describe():
    assert models.names("text") == ["pystdlib"]
    assert models.names("all") == [*models.names(), "pystdlib"]
    meta = models.info("pystdlib")
    text = models.describe("pystdlib")
    assert "Held-out loss" in text and "byte-level BPE" in text and "Mechanism" in text
    assert meta["held_out"]["loss"] < meta["held_out"]["unigram_loss"] - 1
    assert meta["corpus"]["n_files"] > 100 and len(meta["corpus"]["files_sha256"]) == 64
    with pytest.raises((tl_depass.DepassError, TypeError), match="kind"):  # TypeError: beartype
        models.names("every")


@needs_model
def test_tokenizer_round_trips_code(model):
    for code in HELD_OUT + ['x = {"é": [1, 2.5e-3]}\n\tif x:\r\n        pass  # ünïcode 🐍\n', ""]:
        tokens = model.to_tokens(code)[0]
        assert len(tokens) < model.cfg.n_ctx  # to_tokens truncates at n_ctx
        assert tokens[0] == model.tokenizer.bos_token_id == 0
        assert model.tokenizer.decode(tokens[1:]) == code
    assert model.to_str_tokens("def f(self):")[:4] == ["<|endoftext|>", "def", " f", "("]


@needs_model
def test_held_out_loss_is_below_the_measured_bound(model):
    losses = []
    for code in HELD_OUT:
        tokens = model.to_tokens(code)
        with torch.no_grad():
            logits = model(tokens)[0, :-1]
        losses.append(F.cross_entropy(logits, tokens[0, 1:]))
    assert torch.stack(losses).mean() < LOSS_BOUND


@needs_model
def test_reference_logits(model):
    """Written by the hooked backend (TL 3.9) at training time, from the float16 weights."""
    ref = models.info("pystdlib")["reference"]
    with torch.no_grad():
        logits = model(torch.tensor([ref["tokens"]]))[0, -1]
    torch.testing.assert_close(logits, torch.tensor(ref["last_logits"]), rtol=0, atol=1e-4)


def test_tokenizer_file_goes_through_the_allow_list(tmp_path):
    here = models.find("pystdlib")[0].parent
    for suffix in (".json", ".safetensors", "_tokenizer.json"):
        shutil.copy(here / f"pystdlib{suffix}", tmp_path / f"m{suffix}")
    meta = json.loads((tmp_path / "m.json").read_text())

    def write(**changes):
        (tmp_path / "m.json").write_text(json.dumps({**meta, **changes}))
        return tmp_path / "m.json"

    tok = meta["tokenizer"]
    with pytest.raises(tl_depass.DepassError, match="tokenizer file .* is missing"):
        models.load(write(tokenizer=tok))  # still names pystdlib_tokenizer.json
    for bad in ({**tok, "file": "../m_tokenizer.json"}, {**tok, "file": "/etc/passwd.json"},
                {**tok, "trust_remote_code": True}, {**tok, "type": "sentencepiece"}, "m_tokenizer.json"):
        with pytest.raises(tl_depass.DepassError, match="'tokenizer' must be an object"):
            models.load(write(tokenizer=bad))
    with pytest.raises(tl_depass.DepassError, match="config keys .* not allowed"):
        models.load(write(tokenizer={**tok, "file": "m_tokenizer.json"},
                          config={**meta["config"], "tokenizer_name": "gpt2"}))
    (tmp_path / "m_tokenizer.json").write_text("{not json")
    with pytest.raises(tl_depass.DepassError, match="not a tokenizers JSON file"):
        models.load(write(tokenizer={**tok, "file": "m_tokenizer.json"}))
    shutil.copy(here / "pystdlib_tokenizer.json", tmp_path / "m_tokenizer.json")
    if HOOKED or native_bridge() is not None:
        model = models.load(write(tokenizer={**tok, "file": "m_tokenizer.json"}))
        assert model.to_str_tokens("def f(self):")[:2] == ["<|endoftext|>", "def"]


@needs_hooked
def test_indentation_is_read_from_the_line_start_and_carried_by_two_heads(model):
    """docs/models.md, pystdlib: after `if c:` the model knows the next line's indentation from the
    newline token that starts the `if` line (DePass, token level), and zeroing the two heads DePass
    credits most (L1H3, L0H0) makes it prefer the wrong depth; the two it credits least do not."""
    pairs = text_probes.make(model, "indent", 32, seed=0)
    r = text_mechanisms.family(model, pairs)
    assert r["clean_prefers_answer"] >= 0.95 and r["corrupted_prefers_wrong"] >= 0.95  # 1.00, 1.00
    assert r["depass_top_position_is_key"] >= 0.9  # 1.00
    assert r["top_heads"] == [(1, 3), (0, 0)]
    assert r["ablate_top"] < 0 < r["clean"] - 1 < r["ablate_least"]  # -1.94; 2.76; 3.34
    paths = text_mechanisms.head_paths(model, pairs, 0)  # L0H0 acts through MLP 0
    assert paths["mlp0"] < 1.5 < 2.3 < min(paths["attention1"], paths["mlp1"], paths["direct"])


@needs_hooked
@pytest.mark.parametrize("name", ["quotes", "brackets"])
def test_one_layer_0_head_tracks_the_open_quote_and_bracket(model, name):
    """L0H1 is the top head for DePass and for activation patching on both probes (Pearson 0.97)."""
    r = text_mechanisms.family(model, text_probes.make(model, name, 32, seed=0))
    assert r["top_heads"][0] == r["top_patched_heads"][0] == (0, 1)
    assert r["pearson"] >= 0.9
    assert r["ablate_top"] < 0.6 * r["clean"] and r["ablate_least"] > 0.9 * r["clean"]


def test_corpus_is_pinned():
    """The corpus list is sorted, leaves out tests and other people's packages, and holds out the
    same files every time; on the interpreter the model was built from, the hashes match."""
    import platform

    from tl_depass.models import corpus

    paths = corpus.files()
    assert paths == sorted(paths) and len(paths) > 100
    assert not any(set(p.split("/")[:-1]) & set(corpus.EXCLUDED) for p in paths)
    train, held = corpus.split(paths)
    assert len(held) + len(train) == len(paths) and 0.02 < len(held) / len(paths) < 0.1
    assert corpus.split(paths) == (train, held)
    pinned = models.info("pystdlib")["corpus"]
    if platform.python_version() == pinned["python"]:
        manifest = corpus.manifest(paths)
        for key in ("n_files", "n_chars", "files_sha256", "contents_sha256", "held_out"):
            assert manifest[key] == pinned[key], key
    with pytest.raises(tl_depass.DepassError, match="does not exist"):
        corpus.files("/no/such/folder")
