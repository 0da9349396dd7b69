"""TinyStories (Eldan & Li, 2023; CDLA-Sharing-1.0): import, byte-level BPE tokenizer, token files.

Layout of the cache (root from :func:`sqs.data.cache.cache_dir`)::

    <cache>/tinystories/train.txt              stories joined with "\\n<|endoftext|>\\n"
    <cache>/tinystories/valid.txt              same, validation split
    <cache>/tinystories/import_report.json     counts, sha256 of both splits
    <cache>/tinystories/tokenizer-<V>.json     byte-level BPE, <|endoftext|> = id 0
    <cache>/tinystories/tokenizer-<V>.meta.json  the train-split sha256 it was trained on
    <cache>/tinystories/tokens-<split>-<key>.bin   uint16 token ids, EOT after every story
    <cache>/tinystories/tokens-<split>-<key>.json  tokens / bytes / stories of that file
    <cache>/tinystories/download/              official files when fetched from the hub

The package never reads a shared data folder on its own: :func:`fetch` with ``src`` (the CLI's
``sqs data fetch tinystories --from DIR``) copies from a folder the user names, and without ``src``
it downloads the official ``TinyStories-train.txt`` / ``TinyStories-valid.txt`` from the Hugging
Face dataset repo ``roneneldan/TinyStories``.

Bits per byte: ``bpb = mean_loss_nats_per_token * tokens / bytes / ln 2`` with ``tokens`` and
``bytes`` from :func:`split_stats` (see :func:`bits_per_byte`). ``tokens`` counts one
``<|endoftext|>`` per story; ``bytes`` counts the UTF-8 bytes of the story texts only (no
separators), so the end-of-story predictions are charged to the story's bytes.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import json
import math
import os
import re
import time
import unicodedata
import urllib.error
import urllib.request
import zlib
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from sqs.data.cache import cache_dir as _cache_root
from sqs.io import atomic_write, write_json

__all__ = [
    "TinyStoriesError",
    "EOT",
    "OFFICIAL_URLS",
    "import_corpus",
    "fetch",
    "download",
    "repair_mojibake",
    "iter_stories",
    "train_tokenizer",
    "load_tokenizer",
    "encode_split",
    "split_stats",
    "bits_per_byte",
    "prepare",
    "sample_dir",
    "data_dir",
]

EOT = "<|endoftext|>"
JOINER = f"\n{EOT}\n"
SPLITS = ("train", "valid")
HOLDOUT_PER_10000 = 200  # 2 % hash-based validation holdout when no "valid" file is given

_HF = "https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main/"
#: The official V1 text files (the names decide the split: "valid" in the name -> validation).
OFFICIAL_URLS = {
    "TinyStories-train.txt": _HF + "TinyStories-train.txt",
    "TinyStories-valid.txt": _HF + "TinyStories-valid.txt",
}
#: sha256 of the official files where known. Empty: the hub reports the LFS sha256 itself
#: (``X-Linked-Etag``), which :func:`download` checks; pin values here to check without it.
OFFICIAL_SHA256: dict[str, str] = {}

_FROM_HINT = ("pass a folder of TinyStories .txt/.txt.gz files instead: "
              "`sqs data fetch tinystories --from DIR` (or fetch(src=DIR))")


class TinyStoriesError(ValueError):
    """The TinyStories input or cache is unusable. The message names the file and the fix."""


# ----------------------------------------------------------------------------------------------
# Mojibake repair (UTF-8 text that was decoded as cp1252 once, e.g. "â€œ" for "“")
# ----------------------------------------------------------------------------------------------

def _cp1252_char(b: int) -> str:
    try:
        return bytes([b]).decode("cp1252")
    except UnicodeDecodeError:  # 0x81 0x8D 0x8F 0x90 0x9D: sloppy decoders keep them as C1 controls
        return chr(b)


_BYTE_OF = {_cp1252_char(b): b for b in range(0x80, 0x100)}
_CONT = "".join(_cp1252_char(b) for b in range(0x80, 0xC0))
_LEAD2 = "".join(_cp1252_char(b) for b in range(0xC2, 0xE0))
_LEAD3 = "".join(_cp1252_char(b) for b in range(0xE0, 0xF0))
_LEAD4 = "".join(_cp1252_char(b) for b in range(0xF0, 0xF5))


def _cls(chars: str) -> str:
    return "[" + "".join(re.escape(c) for c in chars) + "]"


_MOJIBAKE = re.compile(
    f"{_cls(_LEAD2)}{_cls(_CONT)}"
    f"|{_cls(_LEAD3)}{_cls(_CONT)}{{2}}"
    f"|{_cls(_LEAD4)}{_cls(_CONT)}{{3}}"
    # "”" is E2 80 9D; 0x9D is undefined in cp1252, so it is usually lost and "â€" is left.
    f"|\u00e2\u20ac(?!{_cls(_CONT)})"
)
_ANY_LEAD = re.compile("[\u00c2-\u00f4]")
# In a lowercased file "Ã©" (é) became "ã©"; repaired only in files flagged as lowercased.
_MOJIBAKE_LOWER = re.compile(f"\u00e3{_cls(_CONT)}")


def _fix_one(m: re.Match) -> str:
    s = m.group(0)
    if s == "\u00e2\u20ac":
        return "\u201d"
    try:
        fixed = bytes(_BYTE_OF[c] for c in s).decode("utf-8")
    except (KeyError, UnicodeDecodeError):
        return s
    if any(unicodedata.category(c) in ("Cc", "Cs") for c in fixed):
        return s
    return fixed


def _fix_lower(m: re.Match) -> str:
    s = m.group(0)
    try:
        fixed = bytes([0xC3, _BYTE_OF[s[1]]]).decode("utf-8").lower()
    except (KeyError, UnicodeDecodeError):
        return s
    return s if unicodedata.category(fixed) == "Cc" else fixed


def repair_mojibake(text: str, lowercased: bool = False) -> tuple[str, int]:
    """Undo UTF-8-read-as-cp1252 double encoding (``â€œ`` -> ``“``, ``â€™`` -> ``’``, ``â€`` -> ``”``).

    Only a sequence that re-encodes to valid UTF-8 (and yields no control character) is replaced,
    so clean text is left alone. Returns ``(text, number of sequences repaired)``.
    """
    n = 0

    def count(fix: Callable[[re.Match], str]) -> Callable[[re.Match], str]:
        def f(m: re.Match) -> str:
            nonlocal n
            out = fix(m)
            n += out != m.group(0)
            return out
        return f

    if text.isascii():
        return text, 0
    if _ANY_LEAD.search(text):
        text = _MOJIBAKE.sub(count(_fix_one), text)
    if lowercased and "\u00e3" in text:
        text = _MOJIBAKE_LOWER.sub(count(_fix_lower), text)
    return text, n


# ----------------------------------------------------------------------------------------------
# Import
# ----------------------------------------------------------------------------------------------

def data_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """``<cache>/tinystories`` (created)."""
    d = _cache_root(cache_dir) / "tinystories"
    d.mkdir(parents=True, exist_ok=True)
    return d


def sample_dir() -> Path:
    """The small TinyStories sample shipped with the package (one train and one valid .txt.gz)."""
    return Path(__file__).resolve().parent.parent / "assets" / "tinystories-sample"


def _is_valid_name(name: str) -> bool:
    return re.search(r"(?<!in)valid", name.lower()) is not None


def _list_inputs(src: Path) -> list[Path]:
    if not src.exists():
        raise TinyStoriesError(f"{src}: folder not found. To fix: {_FROM_HINT}.")
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
    ``lowercased_files``: in the team copy this is real TinyStories text (V1 train stories
    ~2317-5000, found nowhere else), ~12 % of the training characters. The model simply sees some
    lowercase stories; the validation split keeps the original case, so evaluation is unaffected.
    Drop such a file from the folder to exclude it.

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
    out = data_dir(cache_dir)

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
    write_json(out / "import_report.json", report)
    return report


# ----------------------------------------------------------------------------------------------
# Download (official files from the Hugging Face hub; resumable with HTTP Range)
# ----------------------------------------------------------------------------------------------

def _sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *a, **k):  # surface the 302 (the hub puts X-Linked-* on it)
        return None


def _remote_info(url: str, timeout: float) -> tuple[int | None, str | None]:
    """(size, sha256) the server announces, either may be None. HF LFS: X-Linked-Size / X-Linked-Etag."""
    req = urllib.request.Request(url, method="HEAD", headers={"User-Agent": "sqs", "Accept-Encoding": "identity"})
    opener = urllib.request.build_opener(_NoRedirect)
    try:
        resp = opener.open(req, timeout=timeout)
        headers = resp.headers
        resp.close()
    except urllib.error.HTTPError as e:
        if e.code not in (301, 302, 303, 307, 308):
            raise
        headers = e.headers
    size = headers.get("X-Linked-Size") or headers.get("Content-Length")
    etag = (headers.get("X-Linked-Etag") or headers.get("ETag") or "").strip('"').removeprefix("W/").strip('"')
    sha = etag.lower() if re.fullmatch(r"[0-9a-fA-F]{64}", etag) else None
    return (int(size) if size and size.isdigit() else None), sha


def download(url: str, dest: str | os.PathLike, sha256: str | None = None, progress: bool = True,
             timeout: float = 60.0, retries: int = 5) -> Path:
    """Download ``url`` to ``dest``, resuming a partial ``dest.part`` with HTTP Range requests.

    The sha256 is checked when known (argument, else the hub's ``X-Linked-Etag`` for LFS files);
    a mismatch deletes the partial file and raises. An existing ``dest`` that matches is reused.
    """
    from tqdm.auto import tqdm

    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    size, remote_sha = None, None
    try:
        size, remote_sha = _remote_info(url, timeout)
    except (urllib.error.URLError, OSError, ValueError, http.client.HTTPException):
        pass  # the GET below reports real failures
    sha256 = (sha256 or remote_sha or "").lower() or None
    if dest.exists() and (size is None or dest.stat().st_size == size) and (
            sha256 is None or _sha256_file(dest) == sha256):
        return dest

    last_err: Exception | None = None
    done = False
    for attempt in range(retries):
        start = part.stat().st_size if part.exists() else 0
        if size is not None and start > size:
            part.unlink()
            start = 0
        if size is not None and start == size:
            done = True
            break
        headers = {"User-Agent": "sqs", "Accept-Encoding": "identity"}
        if start:
            headers["Range"] = f"bytes={start}-"
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout) as r:
                if start and r.status != 206:  # server ignored the Range: start over
                    start = 0
                if size is None:
                    length = r.headers.get("Content-Length")
                    size = start + int(length) if length and length.isdigit() else None
                with open(part, "ab" if start else "wb") as f, tqdm(
                        total=size, initial=start, unit="B", unit_scale=True, desc=dest.name,
                        disable=not progress) as bar:
                    while chunk := r.read(1 << 20):
                        f.write(chunk)
                        bar.update(len(chunk))
            if size is None or part.stat().st_size >= size:
                done = True
                break
            last_err = OSError(f"connection closed at {part.stat().st_size} of {size} bytes")
        except urllib.error.HTTPError as e:
            if e.code == 416 and size is not None and start == size:
                done = True
                break
            last_err = e
            if e.code in (401, 403, 404):
                break
        except (urllib.error.URLError, OSError, TimeoutError, http.client.HTTPException) as e:
            last_err = e  # dropped connection (IncompleteRead) etc.: retry, resuming
        if attempt + 1 < retries:
            time.sleep(min(2 ** attempt, 30) * 0.5)
    if not done:
        raise OSError(f"download of {url} failed after {attempt + 1} tries: {last_err}")
    if not part.exists() or (size is not None and part.stat().st_size != size):
        raise OSError(f"download of {url} failed: got {part.stat().st_size if part.exists() else 0}"
                      f" of {size} bytes")
    if sha256 is not None:
        got = _sha256_file(part)
        if got != sha256:
            part.unlink()
            raise OSError(f"{url}: sha256 mismatch (got {got}, expected {sha256}); the partial file was removed")
    os.replace(part, dest)
    return dest


def fetch(src: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None,
          progress: bool = True) -> dict:
    """Import TinyStories into the cache: from the folder ``src``, else download the official files.

    Without ``src`` the V1 ``TinyStories-train.txt`` (~1.9 GB) and ``TinyStories-valid.txt`` are
    downloaded (resumable) into ``<cache>/tinystories/download/`` and imported from there. If the
    download fails, :class:`TinyStoriesError` says to pass ``--from DIR`` instead.
    """
    if src is not None:
        return import_corpus(src, cache_dir=cache_dir, progress=progress)
    dl = data_dir(cache_dir) / "download"
    for name, url in OFFICIAL_URLS.items():
        try:
            download(url, dl / name, sha256=OFFICIAL_SHA256.get(name), progress=progress)
        except (OSError, urllib.error.URLError, ValueError) as e:
            raise TinyStoriesError(f"could not download {url} ({e}). To fix: {_FROM_HINT}.") from e
    report = import_corpus(dl, cache_dir=cache_dir, progress=progress)
    report["downloaded"] = {name: str(dl / name) for name in OFFICIAL_URLS}
    return report


# ----------------------------------------------------------------------------------------------
# Splits, tokenizer, token files
# ----------------------------------------------------------------------------------------------

def _split_path(split: str, cache_dir) -> Path:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
    p = data_dir(cache_dir) / f"{split}.txt"
    if not p.exists():
        raise TinyStoriesError(
            f"{p}: no imported TinyStories corpus. To fix: run `sqs data fetch tinystories --from DIR` "
            "(or sqs.data.tinystories.fetch(src=DIR)) first.")
    return p


def _split_sha256(split: str, cache_dir) -> str:
    """sha256 of the split file: from import_report.json when size and mtime still match."""
    p = _split_path(split, cache_dir)
    st = p.stat()
    try:
        info = json.loads((p.parent / "import_report.json").read_text())["splits"][split]
        if info["size"] == st.st_size and info["mtime_ns"] == st.st_mtime_ns:
            return info["sha256"]
    except (OSError, KeyError, ValueError, TypeError):
        pass
    return _sha256_file(p)


def iter_stories(split: str, cache_dir: str | os.PathLike | None = None) -> Iterator[str]:
    """The stories of an imported split, in order."""
    p = _split_path(split, cache_dir)
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


def _check_vocab(vocab_size: int) -> None:
    if not 257 <= int(vocab_size) <= 65535:
        raise ValueError(f"vocab_size must be in [257, 65535] (byte alphabet + EOT; uint16 token files), "
                         f"got {vocab_size}")


def _tok_paths(cache_dir, vocab_size: int) -> tuple[Path, Path]:
    d = data_dir(cache_dir)
    return d / f"tokenizer-{vocab_size}.json", d / f"tokenizer-{vocab_size}.meta.json"


def _count_stories(split: str, cache_dir) -> int | None:
    try:
        rep = json.loads((data_dir(cache_dir) / "import_report.json").read_text())
        return int(rep["splits"][split]["stories"])
    except (OSError, KeyError, ValueError, TypeError):
        return None


def train_tokenizer(cache_dir: str | os.PathLike | None = None, vocab_size: int = 4096,
                    progress: bool = False):
    """Byte-level BPE (``<|endoftext|>`` = id 0) trained on the train split; cached and reused.

    Saved as ``<cache>/tinystories/tokenizer-<vocab_size>.json``; the side file
    ``tokenizer-<vocab_size>.meta.json`` records the train-split sha256, and the tokenizer is
    retrained when the corpus changed. Returns a ``tokenizers.Tokenizer``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    _check_vocab(vocab_size)
    train_sha = _split_sha256("train", cache_dir)
    path, meta_path = _tok_paths(cache_dir, vocab_size)
    if path.exists() and meta_path.exists():
        try:
            meta = json.loads(meta_path.read_text())
            if meta.get("train_sha256") == train_sha and meta.get("tokenizer_sha256") == _sha256_file(path):
                return Tokenizer.from_file(str(path))
        except (OSError, ValueError):
            pass

    t0 = time.time()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=int(vocab_size), special_tokens=[EOT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=progress)
    tok.train_from_iterator(iter_stories("train", cache_dir), trainer=trainer,
                            length=_count_stories("train", cache_dir))
    if tok.token_to_id(EOT) != 0:
        raise RuntimeError(f"{EOT} did not get id 0")
    atomic_write(path, lambda p: tok.save(str(p)))
    import tokenizers

    write_json(meta_path, dict(vocab_size=int(vocab_size), actual_vocab_size=tok.get_vocab_size(),
                               train_sha256=train_sha, tokenizer_sha256=_sha256_file(path),
                               tokenizers_version=tokenizers.__version__,
                               seconds=round(time.time() - t0, 2)))
    return tok


def load_tokenizer(cache_dir: str | os.PathLike | None = None, vocab_size: int = 4096):
    """The cached tokenizer (no training; raises :class:`TinyStoriesError` if it is missing)."""
    from tokenizers import Tokenizer

    _check_vocab(vocab_size)
    path, _ = _tok_paths(cache_dir, vocab_size)
    if not path.exists():
        raise TinyStoriesError(f"{path}: no tokenizer yet. To fix: run sqs.data.tinystories.prepare("
                               f"vocab_size={vocab_size}) or `sqs data fetch tinystories --from DIR`.")
    return Tokenizer.from_file(str(path))


def _batched(it: Iterable[str], n: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for x in it:
        batch.append(x)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


def _token_paths(split: str, key: str, cache_dir) -> tuple[Path, Path]:
    d = data_dir(cache_dir)
    return d / f"tokens-{split}-{key}.bin", d / f"tokens-{split}-{key}.json"


def _token_meta(split: str, cache_dir, vocab_size: int, progress: bool) -> tuple[Path, dict]:
    """Make sure the token file exists (encode if needed); return its path and side-file content."""
    from tqdm.auto import tqdm

    _check_vocab(vocab_size)
    tok = train_tokenizer(cache_dir, vocab_size, progress=progress)
    tok_path, _ = _tok_paths(cache_dir, vocab_size)
    split_sha, tok_sha = _split_sha256(split, cache_dir), _sha256_file(tok_path)
    key = hashlib.sha256(f"{split_sha}:{tok_sha}".encode()).hexdigest()[:16]
    bin_path, meta_path = _token_paths(split, key, cache_dir)
    if bin_path.exists() and meta_path.exists():
        try:
            meta = json.loads(meta_path.read_text())
            if meta["split_sha256"] == split_sha and meta["tokenizer_sha256"] == tok_sha \
                    and bin_path.stat().st_size == 2 * meta["tokens"]:
                return bin_path, meta
        except (OSError, KeyError, ValueError, TypeError):
            pass

    eot = tok.token_to_id(EOT)
    if tok.get_vocab_size() > 65535:
        raise ValueError("tokenizer vocabulary does not fit uint16")
    counts = dict(tokens=0, bytes=0, stories=0)
    t0 = time.time()

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f, tqdm(total=_count_stories(split, cache_dir), unit="story",
                                        desc=f"encode {split}", disable=not progress) as bar:
            for batch in _batched(iter_stories(split, cache_dir), 1024):
                encs = tok.encode_batch(batch, add_special_tokens=False)
                lens = [len(e.ids) + 1 for e in encs]
                arr = np.empty(sum(lens), dtype=np.uint16)
                pos = 0
                for e, n in zip(encs, lens):
                    arr[pos:pos + n - 1] = e.ids
                    arr[pos + n - 1] = eot
                    pos += n
                f.write(arr.tobytes())
                counts["tokens"] += len(arr)
                counts["stories"] += len(batch)
                counts["bytes"] += sum(len(s.encode("utf-8")) for s in batch)
                bar.update(len(batch))

    atomic_write(bin_path, write)
    meta = dict(split=split, vocab_size=int(vocab_size), key=key, **counts,
                split_sha256=split_sha, tokenizer_sha256=tok_sha, eot_id=eot, dtype="uint16",
                seconds=round(time.time() - t0, 2))
    write_json(meta_path, meta)
    # Stale token files of this split and vocabulary (corpus or tokenizer changed) go away.
    for old_meta in bin_path.parent.glob(f"tokens-{split}-*.json"):
        if old_meta == meta_path:
            continue
        try:
            if json.loads(old_meta.read_text()).get("vocab_size") != int(vocab_size):
                continue
        except (OSError, ValueError):
            continue
        old_meta.with_suffix(".bin").unlink(missing_ok=True)
        old_meta.unlink(missing_ok=True)
    return bin_path, meta


def encode_split(split: str, cache_dir: str | os.PathLike | None = None, vocab_size: int = 4096,
                 progress: bool = True) -> np.memmap:
    """The split's tokens as a read-only 1-D uint16 memmap (every story followed by the EOT id).

    Stored as ``<cache>/tinystories/tokens-<split>-<key>.bin`` with key = short hash of (split
    sha256, tokenizer-json sha256): reused while both match, re-encoded (with ``encode_batch``)
    otherwise; stale files of the same split and vocabulary are removed.
    """
    path, meta = _token_meta(split, cache_dir, vocab_size, progress)
    return np.memmap(path, dtype=np.uint16, mode="r", shape=(meta["tokens"],))


def split_stats(split: str, cache_dir: str | os.PathLike | None = None, vocab_size: int = 4096) -> dict:
    """``dict(tokens=, bytes=, stories=)`` of a split's token file (built if needed).

    ``bytes`` is the UTF-8 size of the story texts (separators excluded); see :func:`bits_per_byte`.
    """
    path, meta = _token_meta(split, cache_dir, vocab_size, progress=False)
    return dict(tokens=meta["tokens"], bytes=meta["bytes"], stories=meta["stories"], path=str(path),
                bytes_per_token=meta["bytes"] / meta["tokens"] if meta["tokens"] else float("nan"))


def bits_per_byte(mean_loss_nats: float, tokens: int, n_bytes: int) -> float:
    """Convert a mean cross-entropy per token (nats) to bits per UTF-8 byte."""
    return mean_loss_nats * tokens / n_bytes / math.log(2)


def prepare(cache_dir: str | os.PathLike | None = None, vocab_size: int = 4096, progress: bool = True) -> dict:
    """Tokenizer plus both token files (built or reused); what the trainer calls.

    Returns ``dict(tokenizer=path, vocab_size=, actual_vocab_size=, eot_id=0, train=stats, valid=stats,
    seconds=)`` where stats is :func:`split_stats`' dict.
    """
    t0 = time.time()
    tok = train_tokenizer(cache_dir, vocab_size, progress=progress)
    out = dict(tokenizer=str(_tok_paths(cache_dir, vocab_size)[0]), vocab_size=int(vocab_size),
               actual_vocab_size=tok.get_vocab_size(), eot_id=tok.token_to_id(EOT))
    for split in SPLITS:
        path, meta = _token_meta(split, cache_dir, vocab_size, progress)
        out[split] = dict(tokens=meta["tokens"], bytes=meta["bytes"], stories=meta["stories"], path=str(path),
                          bytes_per_token=meta["bytes"] / meta["tokens"] if meta["tokens"] else float("nan"))
    out["seconds"] = round(time.time() - t0, 2)
    return out
