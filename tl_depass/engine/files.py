"""Reading the files tl_depass loads, none of which can run code (docs/trusted_files.md).

JSON is parsed as data; tensors come from safetensors; torch checkpoints are unpickled with
`weights_only=True`, which builds tensors and plain values (numbers, strings, lists, tuples,
dicts) and refuses anything else before it is called. A file that cannot be read, or does not
hold what it should, raises a DepassError naming the file and what is wrong with it.
"""

import json
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from tl_depass.errors import DepassError

__all__ = ["read_json", "read_safetensors", "read_checkpoint", "check_tensors", "require_keys"]


def read_json(path: Path, what: str) -> dict:
    """The JSON object in `path` (`what` names the kind of file for the message)."""
    try:
        record = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise DepassError(f"cannot read {what} {path}: {e.strerror or e}") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise DepassError(f"{what} {path} is not valid JSON ({e}); it is corrupted or truncated: "
                          "write it again") from None
    if not isinstance(record, dict):
        raise DepassError(f"{what} {path} holds a JSON {type(record).__name__}, not an object: "
                          "write it again")
    return record


def read_safetensors(path: Path, what: str) -> dict[str, Tensor]:
    """Every tensor in the safetensors file `path`."""
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise DepassError(f"{what} {path} is not a readable safetensors file ({e}); it is "
                          "corrupted or truncated: write it again") from None


def read_checkpoint(path: Path, map_location: torch.device | str) -> dict:
    """A torch checkpoint of tensors and plain values, unpickled with `weights_only=True`."""
    try:
        state = torch.load(path, weights_only=True, map_location=map_location)
    except Exception as e:  # arbitrary bytes fail in many ways: KeyError, EOFError, RuntimeError...
        # torch's own message suggests weights_only=False, which would run the file's code: keep
        # only its reason
        found = re.search(r"WeightsUnpickler error: ([^\n]*?)(?:\.\s|\n|$)", str(e))
        reason = (f"it holds something other than tensors and plain values ({found.group(1)}), "
                  "which is never unpickled because that could run code" if found else
                  f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no details'}")
        raise DepassError(f"checkpoint {path} cannot be loaded: {reason}. It is corrupted, truncated "
                          "or not written by tl_depass: delete it (or use another run folder) to "
                          "start afresh") from None
    if not isinstance(state, dict):
        raise DepassError(f"checkpoint {path} holds a {type(state).__name__}, not a dict: it was "
                          "not written by tl_depass; delete it or use another run folder")
    return state


def require_keys(record: dict, keys: tuple[str, ...], path: Path, what: str) -> None:
    """DepassError naming every key of `keys` that `record` (read from `path`) lacks."""
    missing = [k for k in keys if k not in record]
    if missing:
        raise DepassError(f"{what} {path} lacks {missing} (it needs {list(keys)}); it was not "
                          "written by tl_depass or is damaged: write it again")


def check_tensors(expected: dict[str, tuple[int, ...]], got: dict[str, Tensor], path: Path,
                  against: str) -> None:
    """DepassError unless `got` has exactly the names and shapes of `expected`, listing the
    missing, unexpected and misshapen tensors (`against`: what `expected` comes from)."""
    missing = [k for k in expected if k not in got]
    unexpected = [k for k in got if k not in expected]
    shapes = [f"{k} {tuple(got[k].shape)} (expected {tuple(expected[k])})"
              for k in expected if k in got and tuple(got[k].shape) != tuple(expected[k])]
    problems = [f"{label} {', '.join(items)}" for label, items in
                (("missing", missing), ("unexpected", unexpected), ("wrong shapes", shapes)) if items]
    if problems:
        raise DepassError(f"the tensors in {path} do not match {against}: {'; '.join(problems)}. "
                          "Use the weights written together with that config")
