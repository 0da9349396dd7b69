"""Where fetched data, tokenizers and token files live."""

from __future__ import annotations

import os
from pathlib import Path

from sqs.io import UserError


class CacheError(UserError, OSError):
    """The cache root cannot be created or written; the message names it and how to choose another."""


CACHE_HINT = "choose a writable cache folder with --cache-dir DIR or the environment variable SQS_CACHE_DIR"


def cache_dir(override: str | os.PathLike | None = None) -> Path:
    """The cache root: `override`, else $SQS_CACHE_DIR, else ~/.cache/sqs (created)."""
    root = Path(override) if override else Path(os.environ.get("SQS_CACHE_DIR") or Path.home() / ".cache" / "sqs")
    root = root.expanduser()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CacheError(f"cache folder {root} cannot be created ({e.strerror or e}); {CACHE_HINT}") from e
    return root
