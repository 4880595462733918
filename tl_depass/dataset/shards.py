"""A dataset run's directory: `meta.json` (options and the batch plan: the manifest), one shard
per batch under `shards/` (written whole or not at all), and the merged `scores.parquet`.

A batch is done when its shard exists, so a run killed at any point resumes with the batches
that are missing; a rerun with other options into the same directory is refused. The plan is
recorded, so that a resumed or re-sharded run (another number of ranks) computes the same
batches, and the merged table is the same, bit for bit.
"""

import json
import os
from pathlib import Path

import pandas as pd

from tl_depass.engine.files import read_json
from tl_depass.errors import DepassError

FORMAT, VERSION = "tl_depass dataset", 1
META, SCORES, SHARDS = "meta.json", "scores.parquet", "shards"


def write_atomic(path: Path, write) -> None:
    """`write(tmp)` then rename over `path`: a reader (or a resumed run) never sees half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class Store:
    def __init__(self, out: str | Path):
        self.out = Path(out)

    def open(self, options: dict, batch_size: int | None, plan) -> dict:
        """The run's record: the existing one when its options match (else DepassError), or a
        new one with the plan `plan()` makes (batch size, batches of prompt indices)."""
        meta_path = self.out / META
        if self.out.exists() and not self.out.is_dir():
            raise DepassError(f"{self.out} is a file: pass a directory for the run (created if new)")
        if meta_path.exists():
            meta = read_json(meta_path, "the dataset run's manifest")
            if meta.get("format") != FORMAT or meta.get("version") != VERSION:
                raise DepassError(f"{meta_path} is not a {FORMAT} manifest of version {VERSION}: "
                                  "pass another --out / out= directory")
            self.check(meta, options, batch_size)
            return meta
        if self.out.exists() and any(self.out.iterdir()):
            raise DepassError(f"{self.out} is not empty and holds no dataset run ({META} is "
                              "missing): pass an empty or new directory")
        try:
            (self.out / SHARDS).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise DepassError(f"cannot create the run's directory {self.out}: {e.strerror or e}; "
                              "pass a directory you can write to") from None
        size, batches = plan()
        meta = {"format": FORMAT, "version": VERSION, "options": options, "batch_size": size,
                "batches": batches}
        write_atomic(meta_path, lambda p: p.write_text(as_json(meta)))
        return meta

    def check(self, meta: dict, options: dict, batch_size: int | None) -> None:
        old = meta["options"]
        differ = sorted(k for k in old.keys() | options.keys() if old.get(k) != options.get(k))
        if batch_size is not None and batch_size != meta["batch_size"]:
            differ.append(f"batch_size ({meta['batch_size']} there, {batch_size} now)")
        if differ:
            shown = ", ".join(k if "(" in k else f"{k} ({old.get(k)!r:.60} there, "
                              f"{options.get(k)!r:.60} now)" for k in differ)
            raise DepassError(f"{self.out} holds a run with other options: {shown}. Rerun with "
                              f"the same options to resume it, or pass another --out / out= "
                              f"directory (or delete {self.out}) to start a new run")

    def plan(self) -> dict:
        return read_json(self.out / META, "the dataset run's manifest")

    def shard(self, batch: int) -> Path:
        return self.out / SHARDS / f"batch-{batch:06d}.parquet"

    def done(self, batch: int) -> bool:
        return self.shard(batch).exists()

    def write(self, batch: int, frame: pd.DataFrame) -> None:
        write_atomic(self.shard(batch), lambda p: frame.to_parquet(p, index=False))

    def read(self, batch: int) -> pd.DataFrame:
        return pd.read_parquet(self.shard(batch))

    def merge(self, n_batches: int) -> pd.DataFrame:
        """Every shard, in prompt order, written to scores.parquet."""
        missing = [b for b in range(n_batches) if not self.done(b)]
        if missing:
            raise DepassError(f"{len(missing)} batches of {self.out} have no shard (first: "
                              f"{missing[0]}): rerun the same command to compute them")
        table = merged([self.read(b) for b in range(n_batches)])
        write_atomic(self.out / SCORES, lambda p: table.to_parquet(p, index=False))
        return table

    def table(self) -> pd.DataFrame:
        return pd.read_parquet(self.out / SCORES)


def as_json(meta: dict) -> str:
    """The manifest, indented, with one line per batch."""
    head = json.dumps({k: v for k, v in meta.items() if k != "batches"}, indent=1)
    batches = ",\n  ".join(json.dumps(b) for b in meta["batches"])
    return f'{head[:-2]},\n "batches": [\n  {batches}\n ]\n}}\n'


def merged(frames: list[pd.DataFrame]) -> pd.DataFrame:
    """One table in prompt order (each prompt's rows keep their component order)."""
    table = pd.concat(frames, ignore_index=True)
    return table.sort_values("prompt", kind="stable", ignore_index=True)
