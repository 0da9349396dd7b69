"""Token files: each split encoded once to uint16 ids (memory-mapped), keyed by corpus and tokenizer hashes."""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from sqs.data.tinystories.layout import (EOT, SPLITS, count_stories, data_dir, iter_stories, sha256_file,
                                         split_sha256)
from sqs.data.tinystories.tokenizer import check_vocab, tok_paths, train_tokenizer
from sqs.io import atomic_write, write_json


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

    check_vocab(vocab_size)
    tok = train_tokenizer(cache_dir, vocab_size, progress=progress)
    tok_path, _ = tok_paths(cache_dir, vocab_size)
    split_sha, tok_sha = split_sha256(split, cache_dir), sha256_file(tok_path)
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
    out = dict(tokenizer=str(tok_paths(cache_dir, vocab_size)[0]), vocab_size=int(vocab_size),
               actual_vocab_size=tok.get_vocab_size(), eot_id=tok.token_to_id(EOT))
    for split in SPLITS:
        path, meta = _token_meta(split, cache_dir, vocab_size, progress)
        out[split] = dict(tokens=meta["tokens"], bytes=meta["bytes"], stories=meta["stories"], path=str(path),
                          bytes_per_token=meta["bytes"] / meta["tokens"] if meta["tokens"] else float("nan"))
    out["seconds"] = round(time.time() - t0, 2)
    return out
