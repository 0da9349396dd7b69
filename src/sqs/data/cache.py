"""Where fetched data, tokenizers and token files live."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir(override: str | os.PathLike | None = None) -> Path:
    """The cache root: `override`, else $SQS_CACHE_DIR, else ~/.cache/sqs (created)."""
    root = Path(override) if override else Path(os.environ.get("SQS_CACHE_DIR") or Path.home() / ".cache" / "sqs")
    root = root.expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root
