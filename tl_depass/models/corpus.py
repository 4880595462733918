"""The real-text corpus of the `pystdlib` model: the running interpreter's standard library.

Every Python installation holds the same real text that no one here wrote: the `.py` source of its
standard library (code, comments, docstrings). `files()` lists it in a pinned order (sorted
POSIX paths relative to `sysconfig`'s stdlib folder, without tests, site-packages and a few
generated or data-only folders, see EXCLUDED); `held_out(path)` puts one file in 20 aside (by a
hash of its path, so the split does not move when files are added elsewhere); `manifest()`
records the Python version and SHA-256s of the file list and of the contents, so a rebuild can
tell whether it sees the same corpus.

    paths = corpus.files()
    text = corpus.read(paths[0])
    corpus.manifest(paths)["contents_sha256"]
"""

import hashlib
import platform
import sys
import sysconfig
from pathlib import Path

from tl_depass.errors import DepassError

# Folders left out anywhere in the tree: test suites (test/, tests/, and lib2to3's tests), other
# people's packages (site-packages), an application rather than library code (idlelib,
# turtledemo), generated data (pydoc_data: one 800 kB string; encodings: codec tables), bundled
# wheels (ensurepip) and bytecode.
EXCLUDED = ("test", "tests", "site-packages", "dist-packages", "idlelib", "turtledemo",
            "pydoc_data", "encodings", "ensurepip", "__pycache__")
HELD_OUT_EVERY = 20  # one file in 20 is held out (by the SHA-256 of its path)


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def files(root: str | Path | None = None) -> list[str]:
    """The corpus files: sorted POSIX paths relative to `root` (default: the stdlib folder)."""
    root = stdlib_root() if root is None else Path(root)
    if not root.is_dir():
        raise DepassError(f"the standard library folder {root} does not exist; pass the folder "
                          "that holds the Python standard library's .py files")
    out = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if not any(part in EXCLUDED or part.startswith(("config-", "python3"))
                   for part in rel.parts[:-1]):
            out.append(rel.as_posix())
    return sorted(out)


def held_out(path: str) -> bool:
    """Whether the file `path` (as listed by `files()`) is in the held-out split."""
    return int(hashlib.sha256(path.encode()).hexdigest(), 16) % HELD_OUT_EVERY == 0


def split(paths: list[str]) -> tuple[list[str], list[str]]:
    """(training files, held-out files), each in the order of `paths`."""
    return [p for p in paths if not held_out(p)], [p for p in paths if held_out(p)]


def read(path: str, root: str | Path | None = None) -> str:
    """The text of one corpus file (UTF-8, newlines as in the file)."""
    root = stdlib_root() if root is None else Path(root)
    return (root / path).read_bytes().decode("utf-8")


def manifest(paths: list[str], root: str | Path | None = None) -> dict:
    """What pins the corpus: the Python version, the file list (and its SHA-256), the SHA-256 of
    the contents (path, NUL, content, NUL for every file in order), sizes, the held-out files."""
    contents = hashlib.sha256()
    n_chars = 0
    for p in paths:
        text = read(p, root)
        n_chars += len(text)
        contents.update(p.encode() + b"\0" + text.encode() + b"\0")
    return {
        "source": "the Python standard library's .py files (sysconfig stdlib folder), sorted, "
                  f"without folders named {list(EXCLUDED)}",
        "python": platform.python_version(), "implementation": sys.implementation.name,
        "n_files": len(paths), "n_chars": n_chars,
        "files_sha256": hashlib.sha256("\n".join(paths).encode()).hexdigest(),
        "contents_sha256": contents.hexdigest(),
        "held_out": split(paths)[1],
    }


__all__ = ["EXCLUDED", "files", "held_out", "manifest", "read", "split", "stdlib_root"]
