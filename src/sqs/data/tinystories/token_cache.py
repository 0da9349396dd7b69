"""Token files: each split encoded once to uint16 ids (memory-mapped), keyed by corpus and tokenizer hashes.

Each ``.bin`` carries the sha256 of its content in its ``.json`` side file, recorded when it is
written and checked when it is used (once per process and file version); a damaged, truncated or
empty file is encoded again from the imported text, which is itself checked first.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
import warnings
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from sqs.data.cache import writing_cache
from sqs.data.tinystories.layout import (CACHE_FIX, EOT, REIMPORT, SPLITS, TinyStoriesError, count_stories, data_dir,
                                         iter_stories, sha256_file, split_path, split_sha256, verify_split)
from sqs.data.tinystories.tokenizer import check_vocab, tok_paths, train_tokenizer
from sqs.io import DataWarning, atomic_write, write_json


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


_VERIFIED: dict[str, tuple] = {}  # token file -> (size, mtime_ns, inode) whose sha256 matched, this process


def _token_file_problem(bin_path: Path, meta: dict) -> str | None:
    """What is wrong with a token file against its side file, or None: the size the side file
    implies, at least one token, and the sha256 recorded when it was written (hashed once per
    process per file version; a side file from before hashes were recorded gets one now)."""
    tokens = meta.get("tokens")
    if not isinstance(tokens, int) or tokens <= 0:
        return f"its side file records {tokens!r} tokens"
    st = bin_path.stat()
    if st.st_size != 2 * tokens:
        return f"{st.st_size} bytes, but its side file records {tokens} tokens ({2 * tokens} bytes)"
    stamp = (st.st_size, st.st_mtime_ns, st.st_ino)
    if _VERIFIED.get(str(bin_path)) == stamp:
        return None
    got = sha256_file(bin_path)
    want = meta.get("sha256")
    if want is None:  # written before token files carried a hash: record it now (best effort)
        try:
            write_json(bin_path.with_suffix(".json"), {**meta, "sha256": got})
        except OSError:
            pass
    elif got != want:
        return f"damaged (sha256 {got[:16]}..., recorded {want[:16]}... when it was written)"
    _VERIFIED[str(bin_path)] = stamp
    return None


def _token_meta(split: str, cache_dir, vocab_size: int, progress: bool) -> tuple[Path, dict]:
    """Make sure the token file exists and is intact (encode, or re-encode a damaged one);
    return its path and side-file content."""
    from tqdm.auto import tqdm

    check_vocab(vocab_size)
    tok = train_tokenizer(cache_dir, vocab_size, progress=progress)
    tok_path, _ = tok_paths(cache_dir, vocab_size)
    split_sha, tok_sha = split_sha256(split, cache_dir), sha256_file(tok_path)
    key = hashlib.sha256(f"{split_sha}:{tok_sha}".encode()).hexdigest()[:16]
    bin_path, meta_path = _token_paths(split, key, cache_dir)
    if bin_path.exists() and meta_path.exists():
        try:
            meta = json.loads(meta_path.read_text())
            if meta["split_sha256"] == split_sha and meta["tokenizer_sha256"] == tok_sha:
                problem = _token_file_problem(bin_path, meta)
                if problem is None:
                    return bin_path, meta
                warnings.warn(f"{bin_path}: {problem}; encoding it again from the imported {split} split",
                              DataWarning, stacklevel=3)
        except (OSError, KeyError, ValueError, TypeError):
            pass

    text_path = split_path(split, cache_dir)
    verify_split(split, cache_dir)  # never encode a damaged import
    eot = tok.token_to_id(EOT)
    if tok.get_vocab_size() > 65535:
        raise ValueError("tokenizer vocabulary does not fit uint16")
    counts = dict(tokens=0, bytes=0, stories=0)
    digest = hashlib.sha256()
    t0 = time.time()

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f, tqdm(total=count_stories(split, cache_dir), unit="story",
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
                data = arr.tobytes()
                f.write(data)
                digest.update(data)
                counts["tokens"] += len(arr)
                counts["stories"] += len(batch)
                counts["bytes"] += sum(len(s.encode("utf-8")) for s in batch)
                bar.update(len(batch))
        if counts["tokens"] == 0:
            raise TinyStoriesError(f"{text_path}: holds no stories, so its token file would be empty. "
                                   f"To fix: {REIMPORT}.")

    with writing_cache(bin_path.parent, "TinyStories token", CACHE_FIX):
        atomic_write(bin_path, write)
        meta = dict(split=split, vocab_size=int(vocab_size), key=key, **counts,
                    split_sha256=split_sha, tokenizer_sha256=tok_sha, sha256=digest.hexdigest(), eot_id=eot,
                    dtype="uint16", seconds=round(time.time() - t0, 2))
        write_json(meta_path, meta)
        st = bin_path.stat()
        _VERIFIED[str(bin_path)] = (st.st_size, st.st_mtime_ns, st.st_ino)
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


def verify_token_cache(split: str, cache_dir: str | os.PathLike | None = None, vocab_size: int = 4096,
                       progress: bool = False) -> Path:
    """Check a split's token file against the sha256 recorded when it was written, and encode it
    again from the imported text when it is damaged, missing or empty (with a DataWarning);
    returns its path. `prepare`, `encode_split` and `split_stats` do the same on every call, so
    a training run never reads a damaged token file."""
    return _token_meta(split, cache_dir, vocab_size, progress)[0]


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
    out = dict(tokenizer=str(tok_paths(cache_dir, vocab_size)[0]), vocab_size=int(vocab_size),
               actual_vocab_size=tok.get_vocab_size(), eot_id=tok.token_to_id(EOT))
    for split in SPLITS:
        path, meta = _token_meta(split, cache_dir, vocab_size, progress)
        out[split] = dict(tokens=meta["tokens"], bytes=meta["bytes"], stories=meta["stories"], path=str(path),
                          bytes_per_token=meta["bytes"] / meta["tokens"] if meta["tokens"] else float("nan"))
    out["seconds"] = round(time.time() - t0, 2)
    return out
