"""Where fetched data, tokenizers and token files live, and what happens when that place cannot be written."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator

from sqs.io import UserError, os_cause  # os_cause: re-exported, shared with the run directories


class CacheError(UserError, OSError):
    """The cache cannot be created or written; the message names it, the cause and how to choose another."""


CACHE_HINT = "choose a writable cache folder with --cache-dir DIR or the environment variable SQS_CACHE_DIR"


def cache_dir(override: str | os.PathLike | None = None, *, fix: str = CACHE_HINT) -> Path:
    """The cache root: `override`, else $SQS_CACHE_DIR, else ~/.cache/sqs (created; `fix` is the
    advice when it cannot be)."""
    root = Path(override) if override else Path(os.environ.get("SQS_CACHE_DIR") or Path.home() / ".cache" / "sqs")
    root = root.expanduser()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CacheError(f"cache folder {root} cannot be created ({os_cause(e)}); {fix}") from e
    return root


@contextlib.contextmanager
def writing_cache(folder: Path, what: str, fix: str = CACHE_HINT) -> Iterator[None]:
    """Inside the block, an OS error (read-only, full, permission, a file where a folder belongs)
    becomes one CacheError line naming `what`, the folder, the cause and `fix`."""
    try:
        yield
    except CacheError:
        raise
    except (OSError, UnicodeError) as e:
        raise CacheError(f"cannot write the {what} cache {folder} ({os_cause(e)}); {fix}") from e


def check_writable(folder: Path, what: str, fix: str = CACHE_HINT) -> Path:
    """Create `folder` and prove a file can be written in it, before any slow work starts.

    The probe file is created with `mkstemp` and removed at once; any OS error is a CacheError
    (one line: the cache, the cause, the fix)."""
    folder = Path(folder)
    with writing_cache(folder, what, fix):
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".sqs-write-test-", dir=folder)
        os.close(fd)
        os.unlink(tmp)
    return folder
