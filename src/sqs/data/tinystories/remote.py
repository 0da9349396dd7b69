"""Download the official TinyStories files (resumable, sha256-checked) and import them."""

from __future__ import annotations

import http.client
import os
import re
import time
import urllib.error
import urllib.request
from pathlib import Path

from sqs.data.cache import check_writable
from sqs.data.tinystories.corpus import import_corpus
from sqs.data.tinystories.layout import CACHE_FIX, FROM_HINT, TinyStoriesError, data_dir, sha256_file

_HF = "https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main/"
#: The official V1 text files (the names decide the split: "valid" in the name -> validation).
OFFICIAL_URLS = {
    "TinyStories-train.txt": _HF + "TinyStories-train.txt",
    "TinyStories-valid.txt": _HF + "TinyStories-valid.txt",
}
#: sha256 of the official files where known. Empty: the hub reports the LFS sha256 itself
#: (``X-Linked-Etag``), which :func:`download` checks; pin values here to check without it.
OFFICIAL_SHA256: dict[str, str] = {}


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
            sha256 is None or sha256_file(dest) == sha256):
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
        got = sha256_file(part)
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
    dl = check_writable(data_dir(cache_dir) / "download", "TinyStories download", CACHE_FIX)
    for name, url in OFFICIAL_URLS.items():
        try:
            download(url, dl / name, sha256=OFFICIAL_SHA256.get(name), progress=progress)
        except (OSError, urllib.error.URLError, ValueError) as e:
            raise TinyStoriesError(f"could not download {url} ({e}). To fix: {FROM_HINT}.") from e
    report = import_corpus(dl, cache_dir=cache_dir, progress=progress)
    report["downloaded"] = {name: str(dl / name) for name in OFFICIAL_URLS}
    return report
