"""Atomic file writes: a crash never leaves a half-written result behind.

Also the one base class of errors a person can fix (`UserError`): the CLI prints such an
error's message as one line, without a traceback.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator


class UserError(Exception):
    """An error the user can fix: its message is one line naming the problem (file, flag or
    setting) and the fix. The CLI prints it without a traceback and exits with status 2."""


class ConfigError(UserError, ValueError):
    """A setting out of range or malformed (the message names it and the valid range)."""


class ArgumentTypeError(UserError, TypeError):
    """An argument of the wrong type (a string where a number belongs, a list where a tensor
    belongs); the message names the argument and the type it must have."""


class DataWarning(UserWarning):
    """Something in a file on disk was damaged and skipped or set aside (nothing was lost)."""


def os_cause(e: BaseException) -> str:
    """What went wrong, in words: strerror (read-only file system, no space left on device,
    permission denied, disk quota exceeded, not a directory, ...)."""
    if isinstance(e, UnicodeError):
        return "the path cannot be encoded on this file system"
    err = getattr(e, "errno", None)
    what = getattr(e, "strerror", None) or (errno.errorcode.get(err, "") if err else "") or str(e) or type(e).__name__
    return what[:1].lower() + what[1:]


@contextlib.contextmanager
def naming_errors(path: str | os.PathLike, *also: str | os.PathLike) -> Iterator[None]:
    """Inside the block, an OSError that names no file (a `write()` that hits a full disk), or
    names one of the temporary paths `also`, is made to name `path`: the file the user knows."""
    try:
        yield
    except OSError as e:
        if e.errno is None:  # a library's own OSError with a message of its own: naming it would garble that
            raise
        if e.filename is None or os.fspath(e.filename) in {os.fspath(a) for a in also}:
            e.filename = os.fspath(path)
        raise


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp_path)`, then rename tmp onto `path` (same directory, so atomic).

    Whatever stops it (an OSError, Ctrl-C, SIGTERM raised as an exception) removes the temporary
    file; an OSError names `path`, not the temporary name."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        if e.filename is None or os.path.basename(os.fsdecode(e.filename)).startswith(f".{path.name}."):
            e.filename = os.fspath(path)  # the temporary's name means nothing to the user
        raise
    os.close(fd)
    try:
        with naming_errors(path, tmp):
            write(Path(tmp))
            _fsync(Path(tmp))  # the data reach the disk before the rename makes them visible
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; results should be readable like any file
            os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _fsync(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return atomic_write(path, lambda p: p.write_bytes(data))


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def save_figure(fig, path: str | os.PathLike, dpi: int = 120, **savefig_kwargs) -> Path:
    """Write a matplotlib figure as PNG atomically, then close it (figures pile up otherwise)."""
    import matplotlib.pyplot as plt

    try:
        return atomic_write(path, lambda p: fig.savefig(p, dpi=dpi, format="png", **savefig_kwargs))
    finally:
        plt.close(fig)


@dataclass
class JsonlScan:
    """A JSON-lines file read line by line: the good records (with their 1-based line
    numbers) and the numbers of the lines that are not a JSON object."""

    records: list[dict] = field(default_factory=list)
    lines: list[int] = field(default_factory=list)
    damaged: list[int] = field(default_factory=list)
    exists: bool = True


def scan_jsonl(path: str | os.PathLike) -> JsonlScan:
    """Every readable record of a JSON-lines file, and the line numbers of damaged ones.

    A damaged line (a partial write, flipped bytes) costs only itself: the lines after it
    are still read. Blank lines are ignored.
    """
    path = Path(path)
    if not path.exists():
        return JsonlScan(exists=False)
    out = JsonlScan()
    with open(path, "rb") as f:
        for n, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                out.damaged.append(n)
                continue
            if isinstance(rec, dict):
                out.records.append(rec)
                out.lines.append(n)
            else:
                out.damaged.append(n)
    return out


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Records of a JSON-lines file (none if it does not exist).

    Damaged lines are skipped with a DataWarning naming the file and line numbers; the
    records after them are kept (a line cut short by a crash loses only that line).
    """
    scan = scan_jsonl(path)
    if scan.damaged:
        warnings.warn(f"{path}: line(s) {', '.join(map(str, scan.damaged[:10]))}"
                      f"{' ...' if len(scan.damaged) > 10 else ''} damaged (not a JSON record), skipped",
                      DataWarning, stacklevel=2)
    return scan.records


def append_jsonl(path: str | os.PathLike, record: dict) -> None:
    """Append one record as one line, flushed and fsynced (a crash loses at most this line).

    A write that fails (a full disk) is cut back to where the file ended, so it leaves no
    partial line; the OSError names `path`."""
    line = (json.dumps(record) + "\n").encode("utf-8")
    with naming_errors(path):
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            end = os.fstat(fd).st_size
            try:
                done = 0
                while done < len(line):
                    done += os.write(fd, line[done:])
            except OSError:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, end)
                raise
            os.fsync(fd)
        finally:
            os.close(fd)
