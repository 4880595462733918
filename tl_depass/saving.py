"""The on-disk format of saved results (`Decomposition.save`, `Attribution.save`), in one place.

A saved result is a directory of two files, neither of which can run code (docs/trusted_files.md):

    result.json          format and tl_depass versions, the kind of result, labels, options,
                         the model's facts (name, config hash, n_layers, ...) and token strings
    tensors.safetensors  every tensor, under the names result.json lists

No pickle anywhere: a missing tensor (an absent attention mask) is recorded in the JSON.
"""

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

from safetensors.torch import save_file
from torch import Tensor

from tl_depass.engine.backends import Model
from tl_depass.engine.files import read_json, read_safetensors, require_keys
from tl_depass.errors import DepassError
from tl_depass.levels.label import Label

__all__ = ["FORMAT", "FORMAT_VERSION", "SavedModel", "label_records", "labels_from_records",
           "load_result", "load_results", "model_facts", "save_result"]

FORMAT = "tl_depass result"
FORMAT_VERSION = 1
JSON, TENSORS = "result.json", "tensors.safetensors"
FACTS = ("n_layers", "n_heads", "d_mlp", "d_vocab")


def config_hash(cfg) -> str:
    """sha256 of the sorted JSON of the config's plain fields (ints, floats, strs, bools), but
    not where the model happens to be (`device`, `n_devices`)."""
    plain = {k: v for k, v in sorted(vars(cfg).items())
             if isinstance(v, (int, float, str, bool)) and k not in ("device", "n_devices")
             and not (isinstance(v, float) and not math.isfinite(v))}
    return hashlib.sha256(json.dumps(plain, sort_keys=True).encode()).hexdigest()


def model_facts(model: Model) -> dict:
    """What readouts of a saved result need to know of its model, and what identifies it."""
    cfg = model.cfg
    return {"model_name": getattr(cfg, "model_name", None), "config_sha256": config_hash(cfg),
            **{k: getattr(cfg, k, None) for k in FACTS}}


def label_records(labels: list[Label]) -> list[dict]:
    """The structured labels as JSON records (`result.json`'s "component_labels")."""
    return [{"name": x.name, "kind": x.kind, "layer": x.layer, "index": x.index, "group": x.group}
            for x in labels]


def labels_from_records(meta: dict) -> list[Label]:
    """The structured labels of a saved result; a file saved before they existed has display
    strings only: each becomes a Label of kind "unknown" in its group."""
    if "component_labels" in meta:
        try:
            return [Label(**record) for record in meta["component_labels"]]
        except TypeError:
            raise DepassError("the saved result's component_labels are damaged (each needs name, "
                              "kind, layer, index, group): save it again") from None
    names, n_groups = meta["labels"], meta.get("n_groups", 1)
    size = len(names) // n_groups
    return [Label(name, "unknown", group=c // size) for c, name in enumerate(names)]


@dataclass(frozen=True)
class SavedModel:
    """Stands in for the model of a loaded result: its facts as `cfg`, no weights, no tokenizer.
    `aliases` maps a Bridge's other names of the kept hooks to the canonical ones."""

    cfg: SimpleNamespace
    path: Path
    aliases: dict = field(default_factory=dict)
    tokenizer: None = None

    def __repr__(self) -> str:
        return f"SavedModel({self.cfg.model_name!r}, loaded from {self.path})"


def check_target(path: Path, overwrite: bool) -> None:
    """Refuse to write into a file, a non-empty directory that is not a saved result, or a saved
    result unless `overwrite`."""
    if path.exists() and not path.is_dir():
        raise DepassError(f"cannot save to {path}: it is a file; pass a directory path")
    if not path.is_dir() or not any(path.iterdir()):
        return
    try:
        record = json.loads((path / JSON).read_text(encoding="utf-8"))
        ours = isinstance(record, dict) and record.get("format") == FORMAT
    except (OSError, ValueError):
        ours = False
    if not ours:
        raise DepassError(f"cannot save to {path}: the directory is not empty and holds no saved "
                          "tl_depass result; pass a new or empty directory")
    if not overwrite:
        raise DepassError(f"{path} already holds a saved result; pass overwrite=True to replace it")


def save_result(path, kind: str, record: dict, tensors: dict[str, Tensor | None],
                overwrite: bool) -> Path:
    """Write `record` (JSON-able) and `tensors` (None: recorded as absent) under `path`."""
    from tl_depass import __version__

    path = Path(path)
    check_target(path, overwrite)
    path.mkdir(parents=True, exist_ok=True)
    present = {k: v for k, v in tensors.items() if v is not None}
    # safetensors wants contiguous tensors, each with its own storage (clean["logits"] and
    # clean_logits may be one tensor)
    data = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in present.items()}
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "tl_depass_version": __version__,
            "kind": kind, **record, "tensors": sorted(present),
            "absent": sorted(k for k, v in tensors.items() if v is None)}
    # the JSON, which marks the directory as ours, is written last and replaced atomically
    save_file(data, str(path / TENSORS))
    tmp = path / f".{JSON}.tmp"
    tmp.write_text(json.dumps(meta, indent=1), encoding="utf-8")
    os.replace(tmp, path / JSON)
    return path


def load_results(path, device="cpu"):
    """Whatever result was saved under `path`: a Decomposition or an Attribution."""
    from tl_depass.attribute import Attribution
    from tl_depass.decomposition import Decomposition

    file = Path(path) / JSON
    meta = read_json(file, "saved result")
    require_keys(meta, ("kind",), file, "saved result")
    kinds = {"Decomposition": Decomposition, "Attribution": Attribution}
    if meta["kind"] not in kinds:
        raise DepassError(f"{file} holds a {meta['kind']!r}, which is not a result tl_depass saves")
    return kinds[meta["kind"]].load(path, device)


def load_result(path, kind: str, keys: tuple[str, ...]) -> tuple[dict, dict[str, Tensor | None]]:
    """The record and tensors saved under `path` by `save_result(path, kind, ...)`; `keys`: the
    record's entries the caller needs."""
    path = Path(path)
    if not path.is_dir():
        raise DepassError(f"no saved result at {path}: it is not a directory (pass the directory "
                          f"given to .save)")
    file = path / JSON
    meta = read_json(file, "saved result")
    require_keys(meta, ("format", "format_version", "kind"), file, "saved result")
    if meta["format"] != FORMAT:
        raise DepassError(f"{file} is not a saved tl_depass result (format {meta['format']!r})")
    if meta["format_version"] != FORMAT_VERSION:
        raise DepassError(
            f"{file} is in format version {meta['format_version']!r} (written by tl_depass "
            f"{meta.get('tl_depass_version', '?')}); this tl_depass reads version {FORMAT_VERSION}: "
            "load it with the version that wrote it and save it again")
    if meta["kind"] != kind:
        raise DepassError(f"{file} holds a saved {meta['kind']}, not a {kind}: load it with "
                          f"tl_depass.{meta['kind']}.load")
    require_keys(meta, ("tensors", "absent", *keys), file, "saved result")
    tensors = read_safetensors(path / TENSORS, "saved tensors")
    missing = [k for k in meta["tensors"] if k not in tensors]
    if missing:
        raise DepassError(f"{path / TENSORS} lacks the tensors {missing[:4]} that {file} lists; "
                          "the result is damaged: save it again")
    return meta, {**tensors, **dict.fromkeys(meta["absent"])}
