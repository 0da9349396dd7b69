"""Where the TinyStories cache lives and how to read what was imported (shared by the other modules)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterator

from sqs.data.cache import CACHE_HINT, writing_cache
from sqs.data.cache import cache_dir as _cache_root
from sqs.io import UserError

EOT = "<|endoftext|>"
JOINER = f"\n{EOT}\n"
SPLITS = ("train", "valid")

FROM_HINT = ("pass a folder of TinyStories .txt/.txt.gz files instead: "
             "`sqs data fetch tinystories --from DIR` (or fetch(src=DIR))")


class TinyStoriesError(UserError, ValueError):
    """The TinyStories input or cache is unusable. The message names the file and the fix."""


#: What to do when the TinyStories cache cannot be written.
CACHE_FIX = CACHE_HINT + " (e.g. `sqs data fetch tinystories --from SRC --cache-dir DIR`; Python: cache_dir=DIR)"
#: What repairs a damaged import.
REIMPORT = "re-import it: `sqs data fetch tinystories --from DIR` (Python: sqs.data.tinystories.fetch(src=DIR))"


def data_dir(cache_dir: str | os.PathLike | None = None, *, fix: str = CACHE_FIX) -> Path:
    """``<cache>/tinystories`` (created; `fix` is the advice when it cannot be)."""
    d = _cache_root(cache_dir, fix=fix) / "tinystories"
    with writing_cache(d, "TinyStories", fix):
        d.mkdir(parents=True, exist_ok=True)
    return d


def sample_dir() -> Path:
    """The small TinyStories sample shipped with the package (one train and one valid .txt.gz)."""
    return Path(__file__).resolve().parents[2] / "assets" / "tinystories-sample"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def split_path(split: str, cache_dir) -> Path:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
    p = data_dir(cache_dir) / f"{split}.txt"
    if not p.exists():
        raise TinyStoriesError(
            f"{p}: no imported TinyStories corpus. To fix: run `sqs data fetch tinystories --from DIR` "
            "(or sqs.data.tinystories.fetch(src=DIR)) first.")
    return p


def split_sha256(split: str, cache_dir) -> str:
    """sha256 of the split file: from import_report.json when size and mtime still match."""
    p = split_path(split, cache_dir)
    st = p.stat()
    try:
        info = json.loads((p.parent / "import_report.json").read_text())["splits"][split]
        if info["size"] == st.st_size and info["mtime_ns"] == st.st_mtime_ns:
            return info["sha256"]
    except (OSError, KeyError, ValueError, TypeError):
        pass
    return sha256_file(p)


def verify_split(split: str, cache_dir) -> str:
    """sha256 of the imported split, read in full and compared with the one import_report.json
    recorded when it was written; a mismatch is damage, named with the command that repairs it.
    (Run before anything is built from the text: the tokenizer, the token files.)"""
    p = split_path(split, cache_dir)
    got = sha256_file(p)
    try:
        want = json.loads((p.parent / "import_report.json").read_text())["splits"][split]["sha256"]
    except (OSError, KeyError, ValueError, TypeError):
        return got  # imported before reports recorded it: nothing to compare with
    if got != want:
        raise TinyStoriesError(f"{p}: the imported {split} split is damaged (sha256 {got[:16]}..., recorded "
                               f"{want[:16]}... when it was imported). To fix: {REIMPORT}.")
    return got


def iter_stories(split: str, cache_dir: str | os.PathLike | None = None) -> Iterator[str]:
    """The stories of an imported split, in order."""
    p = split_path(split, cache_dir)
    buf: list[str] = []
    with open(p, encoding="utf-8", newline="\n") as f:
        for line in f:
            line = line[:-1] if line.endswith("\n") else line
            if line == EOT:
                yield "\n".join(buf)
                buf = []
            else:
                buf.append(line)
    if buf:
        yield "\n".join(buf)


def count_stories(split: str, cache_dir) -> int | None:
    try:
        rep = json.loads((data_dir(cache_dir) / "import_report.json").read_text())
        return int(rep["splits"][split]["stories"])
    except (OSError, KeyError, ValueError, TypeError):
        return None
