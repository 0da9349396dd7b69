"""Import a folder of TinyStories text files into the cache's train and valid splits."""

from __future__ import annotations

import gzip
import hashlib
import os
import re
import time
import zlib
from pathlib import Path
from typing import Callable, Iterator

from sqs.data.cache import check_writable, writing_cache
from sqs.data.tinystories.layout import EOT, FROM_HINT, JOINER, TinyStoriesError, data_dir
from sqs.data.tinystories.mojibake import repair_mojibake
from sqs.io import atomic_write, write_json

HOLDOUT_PER_10000 = 200  # 2 % hash-based validation holdout when no "valid" file is given


def _is_valid_name(name: str) -> bool:
    return re.search(r"(?<!in)valid", name.lower()) is not None


def _list_inputs(src: Path) -> list[Path]:
    if not src.exists():
        raise TinyStoriesError(f"{src}: folder not found. To fix: {FROM_HINT}.")
    if not src.is_dir():
        raise TinyStoriesError(f"{src}: not a folder. To fix: pass the folder that holds the .txt/.txt.gz files.")
    files = sorted(p for p in src.iterdir()
                   if p.is_file() and (p.name.endswith(".txt") or p.name.endswith(".txt.gz")))
    if not files:
        raise TinyStoriesError(
            f"{src}: no *.txt or *.txt.gz files in this folder. To fix: put the TinyStories text files "
            f"(one story, then a line {EOT}) there, e.g. TinyStories-train.txt and TinyStories-valid.txt.")
    return files


_CASE_MIN_LETTERS = 200  # ASCII letters counted (fast, on the raw bytes)
_NOT_UPPER = bytes(b for b in range(256) if not 65 <= b <= 90)
_NOT_LOWER = bytes(b for b in range(256) if not 97 <= b <= 122)
_CASE_MAX_UPPER_RATIO = 0.002  # normal story text has ~3 % capitals


def _file_stories(path: Path, stats: dict, pbar=None) -> Iterator[str]:
    """Stories of one input file (raw text or gzip, detected by magic bytes), mojibake repaired.

    Fills ``stats`` (separators, mojibake_repairs, upper, lower) as it goes and raises
    :class:`TinyStoriesError` for a binary / non-UTF-8 / corrupt-gzip file or one without separators.
    Lowercase detection needs the whole file, so a lowercased file's ``ã©``-type repairs are done
    on the fly only once the first 200 letters showed no capitals.
    """
    fix = ("replace it with an intact UTF-8 TinyStories text file (one story, then a line "
           f"{EOT}), or remove it from the folder")
    raw = open(path, "rb")
    try:
        magic = raw.read(2)
        raw.seek(0)
        if magic == b"\x1f\x8b":
            stream = gzip.GzipFile(fileobj=raw, mode="rb")
        elif path.name.endswith(".gz"):
            raise TinyStoriesError(f"{path}: named .gz but is not gzip-compressed. To fix: {fix}.")
        else:
            stream = raw
        buf: list[str] = []
        last_pos = 0

        def flush() -> str | None:
            story = "\n".join(buf).strip()
            buf.clear()
            return story

        lineno = 0
        try:
            for bline in stream:
                lineno += 1
                if b"\x00" in bline:
                    raise TinyStoriesError(
                        f"{path}: binary data (NUL byte on line {lineno}), not a text file. To fix: {fix}.")
                try:
                    line = bline.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise TinyStoriesError(
                        f"{path}: not UTF-8 text (line {lineno}, byte {e.start}: {bline[e.start:e.start + 4]!r})."
                        f" To fix: {fix}; convert other encodings with e.g. `iconv -t UTF-8`.") from None
                if lineno == 1 and line.startswith("\ufeff"):
                    line = line[1:]
                line = line.rstrip("\n").rstrip("\r")
                stats["upper"] += len(bline.translate(None, _NOT_UPPER))
                stats["lower"] += len(bline.translate(None, _NOT_LOWER))
                looks_lower = (stats["upper"] == 0 and stats["lower"] >= _CASE_MIN_LETTERS)
                line, n = repair_mojibake(line, lowercased=looks_lower)
                stats["mojibake_repairs"] += n
                if EOT in line:
                    parts = line.split(EOT)
                    for i, p in enumerate(parts):
                        if i:
                            stats["separators"] += 1
                            yield flush()
                        if p.strip():
                            buf.append(p)
                else:
                    buf.append(line)
                if pbar is not None and lineno % 2048 == 0:
                    pos = raw.tell()
                    pbar.update(pos - last_pos)
                    last_pos = pos
        except (EOFError, OSError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
            raise TinyStoriesError(f"{path}: the gzip stream is corrupt or truncated ({e}). To fix: {fix}.") from e
        if lineno == 0:
            raise TinyStoriesError(f"{path}: empty file. To fix: {fix}.")
        if stats["separators"] == 0:
            raise TinyStoriesError(
                f"{path}: no story separators (no {EOT!r} in the file), so the story boundaries are unknown. "
                f"To fix: put a line {EOT} after each story (the official TinyStories .txt format), "
                "or remove the file from the folder.")
        if buf:
            yield flush()
        if pbar is not None:
            pbar.update(path.stat().st_size - last_pos)
    finally:
        raw.close()


def _digest(story: str) -> bytes:
    return hashlib.blake2b(story.encode("utf-8"), digest_size=16).digest()


def _in_holdout(digest: bytes) -> bool:
    return int.from_bytes(digest[:8], "big") % 10000 < HOLDOUT_PER_10000


class _SplitWriter:
    """Streams stories into an open file, joined with JOINER, counting and hashing as it goes."""

    def __init__(self, f):
        self.f, self.sha = f, hashlib.sha256()
        self.stories = self.characters = self.bytes = 0

    def add(self, story: str) -> None:
        data = story.encode("utf-8")
        chunk = (JOINER.encode() if self.stories else b"") + data
        self.f.write(chunk)
        self.sha.update(chunk)
        self.stories += 1
        self.characters += len(story)
        self.bytes += len(data)


def import_corpus(src_dir: str | os.PathLike, cache_dir: str | os.PathLike | None = None,
                  progress: bool = True) -> dict:
    """Import a folder of TinyStories text files into ``<cache>/tinystories/{train,valid}.txt``.

    Reads every ``*.txt`` / ``*.txt.gz`` in ``src_dir`` (not recursive; gzip detected by content),
    splits stories on ``<|endoftext|>``, repairs cp1252/UTF-8 mojibake, and drops empty stories,
    exact duplicates (after repair and stripping) and train stories that also occur in validation.

    Validation = the files whose name contains ``valid`` (the official validation split). With no
    such file, a deterministic 2 % of the unique stories (by a hash of their text) is held out.

    Lowercased files (almost no capital letters) are **kept** and listed in the report under
    ``lowercased_files``: a lowercased copy can hold stories found nowhere else, so dropping it
    would lose text. The model then sees some lowercase stories; a validation split that keeps the
    original case is evaluated unaffected. Drop such a file from the folder to exclude it.

    Raises :class:`TinyStoriesError` for an empty folder, a file without any separator, a binary or
    non-UTF-8 file, or a split that ends up empty. Returns (and writes as ``import_report.json``) a
    report with per-file and per-split counts and the sha256 of each output.
    """
    from tqdm.auto import tqdm

    t0 = time.time()
    src = Path(src_dir).expanduser()
    files = _list_inputs(src)
    valid_files = [p for p in files if _is_valid_name(p.name)]
    train_files = [p for p in files if not _is_valid_name(p.name)]
    holdout = not valid_files
    fix = ("choose a writable cache folder: `sqs data fetch tinystories --from "
           f"{src} --cache-dir DIR` (or set SQS_CACHE_DIR=DIR; Python: cache_dir=DIR)")
    out = check_writable(data_dir(cache_dir, fix=fix), "TinyStories", fix)  # the real cause first

    seen: dict[bytes, str] = {}  # digest -> split it went to
    per_file: list[dict] = []
    totals = dict(empty_dropped=0, duplicates_within_split=0, train_valid_overlap_dropped=0)
    writers: dict[str, _SplitWriter] = {}
    pbar = tqdm(total=sum(p.stat().st_size for p in files), unit="B", unit_scale=True,
                desc="import tinystories", disable=not progress)

    def run(train_f, valid_f) -> None:
        writers["train"], writers["valid"] = _SplitWriter(train_f), _SplitWriter(valid_f)
        for path, split in [(p, "valid") for p in valid_files] + [(p, "train") for p in train_files]:
            st = dict(separators=0, mojibake_repairs=0, upper=0, lower=0)
            fs = dict(file=path.name, split="holdout" if holdout else split, stories_read=0, stories_kept=0,
                      empty_dropped=0, duplicates_dropped=0, train_valid_overlap_dropped=0)
            for story in _file_stories(path, st, pbar):
                fs["stories_read"] += 1
                if not story:
                    fs["empty_dropped"] += 1
                    continue
                d = _digest(story)
                prev = seen.get(d)
                if prev is not None:
                    if prev == "valid" and split == "train" and not holdout:
                        fs["train_valid_overlap_dropped"] += 1
                    else:
                        fs["duplicates_dropped"] += 1
                    continue
                target = ("valid" if _in_holdout(d) else "train") if holdout else split
                seen[d] = target
                writers[target].add(story)
                fs["stories_kept"] += 1
            if fs["stories_read"] == fs["empty_dropped"]:
                raise TinyStoriesError(f"{path}: holds no stories (only separators and blank lines). To fix: put "
                                       "the stories in it, or remove it from the folder.")
            letters = st["upper"] + st["lower"]
            ratio = st["upper"] / letters if letters else 0.0
            fs.update(separators=st["separators"], mojibake_repairs=st["mojibake_repairs"],
                      uppercase_ratio=round(ratio, 5),
                      lowercased=letters >= _CASE_MIN_LETTERS and ratio < _CASE_MAX_UPPER_RATIO)
            totals["empty_dropped"] += fs["empty_dropped"]
            totals["duplicates_within_split"] += fs["duplicates_dropped"]
            totals["train_valid_overlap_dropped"] += fs["train_valid_overlap_dropped"]
            per_file.append(fs)
        for name, w in writers.items():
            if w.stories == 0:
                why = ("no story fell into the 2 % hash holdout; add a file with 'valid' in its name"
                       if name == "valid" and holdout else f"give at least one {name} file with stories")
                raise TinyStoriesError(f"{src}: the {name} split would be empty. To fix: {why}.")

    def open_and(path: Path, inner: Callable) -> None:
        with open(path, "wb") as f:
            inner(f)

    try:
        with writing_cache(out, "TinyStories", fix):
            atomic_write(out / "train.txt", lambda tp: open_and(
                tp, lambda tf: atomic_write(out / "valid.txt", lambda vp: open_and(vp, lambda vf: run(tf, vf)))))
    finally:
        pbar.close()

    splits = {}
    for name, w in writers.items():
        p = out / f"{name}.txt"
        stt = p.stat()
        splits[name] = dict(path=str(p), stories=w.stories, characters=w.characters, bytes=w.bytes,
                            sha256=w.sha.hexdigest(), size=stt.st_size, mtime_ns=stt.st_mtime_ns)
    report = dict(
        format=1,
        source_dir=str(src),
        n_files=len(files),
        files=per_file,
        validation="files" if not holdout else f"hash holdout {HOLDOUT_PER_10000 / 100:g}%",
        splits=splits,
        stories={k: v["stories"] for k, v in splits.items()},
        characters={k: v["characters"] for k, v in splits.items()},
        duplicates_dropped=totals["duplicates_within_split"] + totals["train_valid_overlap_dropped"],
        **totals,
        mojibake_repairs=sum(f["mojibake_repairs"] for f in per_file),
        lowercased_files=[f["file"] for f in per_file if f["lowercased"]],
        sha256={k: v["sha256"] for k, v in splits.items()},
        seconds=round(time.time() - t0, 2),
    )
    with writing_cache(out, "TinyStories", fix):
        write_json(out / "import_report.json", report)
    return report
