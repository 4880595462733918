"""The tokenizers of the bundled models, built offline from data in the model's files: a word-level
tokenizer from the vocabulary of a task model's JSON, or a byte-level BPE tokenizer from a
`tokenizers` JSON file beside a text model (named in its JSON, see TOKENIZER_KEYS). Neither
runs code from the files."""

import atexit
import functools
import shutil
import tempfile
from pathlib import Path

from tl_depass.errors import DepassError

# A model JSON names its tokenizer in one of two ways: `vocab`, a word list (the task models: a
# word-level tokenizer is built from it), or `tokenizer`, an object with exactly these keys, for
# a byte-level BPE tokenizer saved by the `tokenizers` library in a JSON file beside the model
# (a bare file name: no folders, so a model file cannot point at another file on the machine).
# `tokenizers` parses that file as data (vocabulary, merges, normalisation settings): no code.
TOKENIZER_KEYS = {"type": ("byte_level_bpe",), "file": "a file name ending in .json",
                  "bos": "the BOS token (a string in the tokenizer's vocabulary)"}


def checked_tokenizer(meta: dict, path: Path) -> tuple[Path, str] | None:
    """(tokenizer file, BOS token) if the model JSON read from `path` names a BPE tokenizer."""
    spec = meta.get("tokenizer")
    if spec is None:
        return None
    fix = (f"'tokenizer' must be an object with exactly the keys {list(TOKENIZER_KEYS)} "
           f"(type {TOKENIZER_KEYS['type'][0]!r}; file: the name of a tokenizers JSON file beside "
           f"{path.name}; bos: its BOS token)")
    if not isinstance(spec, dict) or set(spec) != set(TOKENIZER_KEYS):
        raise DepassError(f"{path}: {fix}, got {spec!r}")
    file, bos = spec["file"], spec["bos"]
    if spec["type"] not in TOKENIZER_KEYS["type"] or not isinstance(bos, str) or not (
            isinstance(file, str) and file.endswith(".json") and Path(file).name == file
            and "\\" not in file):
        raise DepassError(f"{path}: {fix}, got {spec!r}")
    tok_path = path.parent / file
    if not tok_path.is_file():
        raise DepassError(f"{path}: its tokenizer file {tok_path} is missing; put the tokenizer "
                          "JSON written with the model beside it")
    return tok_path, bos



@functools.cache
def tokenizer_dir(vocab: tuple[str, ...]) -> str:
    """A word-level tokenizer for `vocab`, saved to a temporary folder (TransformerLens reloads
    tokenizers by path to add BOS handling)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<bos>", pad_token="<pad>",
                                   unk_token="<pad>", eos_token="<bos>")
    path = tempfile.mkdtemp(prefix="tl_depass_tokenizer_")
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    fast.save_pretrained(path)
    return path


def tokenizer(vocab: list[str]):
    """An offline word-level tokenizer: one token per whitespace-separated word."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir(tuple(vocab)))


@functools.cache
def bpe_tokenizer_dir(content: str, bos: str, d_vocab: int, where: str) -> str:
    """The `tokenizers` JSON `content` as a saved Hugging Face tokenizer, BOS = EOS = PAD = `bos`
    (the one special token of a GPT-2-style vocabulary), in a temporary folder."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    try:
        core = Tokenizer.from_str(content)
    except Exception as e:  # tokenizers raises a plain Exception for a malformed file
        raise DepassError(f"tokenizer file {where} is not a tokenizers JSON file ({e}); it is "
                          "corrupted or truncated: write it again") from None
    if core.get_vocab_size() != d_vocab or core.token_to_id(bos) is None:
        raise DepassError(f"tokenizer file {where} has {core.get_vocab_size()} tokens (BOS {bos!r} "
                          f"{'missing' if core.token_to_id(bos) is None else 'present'}) but the "
                          f"model has d_vocab {d_vocab}; use the tokenizer written with the model")
    fast = PreTrainedTokenizerFast(tokenizer_object=core, bos_token=bos, eos_token=bos,
                                   pad_token=bos)
    path = tempfile.mkdtemp(prefix="tl_depass_tokenizer_")
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    fast.save_pretrained(path)
    return path


def bpe_tokenizer(path: Path, bos: str, d_vocab: int):
    """The byte-level BPE tokenizer saved (by `tokenizers`) in `path`."""
    from transformers import AutoTokenizer

    try:
        content = path.read_text(encoding="utf-8")
    except (OSError, ValueError) as e:
        raise DepassError(f"cannot read the tokenizer file {path}: {e}") from None
    return AutoTokenizer.from_pretrained(bpe_tokenizer_dir(content, bos, d_vocab, str(path)))


__all__ = ["TOKENIZER_KEYS", "bpe_tokenizer", "checked_tokenizer", "tokenizer"]
