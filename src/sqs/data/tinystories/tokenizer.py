"""The byte-level BPE tokenizer trained on the imported train split (cached, retrained when the corpus changes).

Every tokenizer file is checked like the weights: its sha256 is recorded when it is written (in
``tokenizer-<V>.meta.json`` for the cache's copy, in a ``<file>.sha256`` line in `sha256sum`
format for a copy elsewhere, e.g. an LM run's ``tokenizer.json``) and compared when it is read.
A damaged cache tokenizer is rebuilt from the imported text; a damaged copy is restored from the
cache when the cache holds the same tokenizer, and named in one line otherwise.
"""

from __future__ import annotations

import json
import numbers
import os
import shutil
import time
import warnings
from pathlib import Path

from sqs.data.cache import writing_cache
from sqs.data.tinystories.layout import (CACHE_FIX, EOT, TinyStoriesError, count_stories, data_dir, iter_stories,
                                         sha256_file, split_path, split_sha256, verify_split)
from sqs.io import DataWarning, atomic_write, write_json, write_text


def check_vocab(vocab_size: int) -> None:
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, numbers.Integral) or not 257 <= vocab_size <= 65535:
        raise TinyStoriesError(f"`vocab_size` must be an int in [257, 65535] (byte alphabet + EOT; uint16 token "
                               f"files), got {vocab_size!r}")


def tok_paths(cache_dir, vocab_size: int) -> tuple[Path, Path]:
    d = data_dir(cache_dir)
    return d / f"tokenizer-{vocab_size}.json", d / f"tokenizer-{vocab_size}.meta.json"


def _read_meta(meta_path: Path) -> dict:
    try:
        meta = json.loads(meta_path.read_text())
        return meta if isinstance(meta, dict) else {}
    except (OSError, ValueError):
        return {}


def _parse(path: Path, fix: str):
    """A tokenizers.Tokenizer from `path`; any failure to parse is a TinyStoriesError naming the file."""
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception ("EOF while parsing ...")
        raise TinyStoriesError(f"{path}: not a readable tokenizer file ({str(e).splitlines()[0][:120]}). "
                               f"To fix: {fix}.") from e


def train_tokenizer(cache_dir: str | os.PathLike | None = None, vocab_size: int = 4096,
                    progress: bool = False):
    """Byte-level BPE (``<|endoftext|>`` = id 0) trained on the train split; cached and reused.

    Saved as ``<cache>/tinystories/tokenizer-<vocab_size>.json``; the side file
    ``tokenizer-<vocab_size>.meta.json`` records the train-split sha256 and the tokenizer's own
    sha256. The tokenizer is retrained when the corpus changed, and rebuilt (with a DataWarning)
    when the file no longer matches its sha256. Returns a ``tokenizers.Tokenizer``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    check_vocab(vocab_size)
    train_sha = split_sha256("train", cache_dir)
    path, meta_path = tok_paths(cache_dir, vocab_size)
    if path.exists() and meta_path.exists():
        meta = _read_meta(meta_path)
        if meta.get("train_sha256") == train_sha:
            if meta.get("tokenizer_sha256") == sha256_file(path):
                return _parse(path, f"delete it; the next run rebuilds it from {split_path('train', cache_dir)}")
            warnings.warn(f"{path}: damaged (its sha256 differs from the one recorded in {meta_path.name}); "
                          "rebuilding it from the imported train split", DataWarning, stacklevel=2)

    verify_split("train", cache_dir)  # never build from a damaged import
    t0 = time.time()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=int(vocab_size), special_tokens=[EOT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=progress)
    tok.train_from_iterator(iter_stories("train", cache_dir), trainer=trainer,
                            length=count_stories("train", cache_dir))
    if tok.token_to_id(EOT) != 0:
        raise RuntimeError(f"{EOT} did not get id 0")
    import tokenizers

    with writing_cache(path.parent, "TinyStories", CACHE_FIX):
        atomic_write(path, lambda p: tok.save(str(p)))
        write_json(meta_path, dict(vocab_size=int(vocab_size), actual_vocab_size=tok.get_vocab_size(),
                                   train_sha256=train_sha, tokenizer_sha256=sha256_file(path),
                                   tokenizers_version=tokenizers.__version__,
                                   seconds=round(time.time() - t0, 2)))
    return tok


def load_tokenizer(cache_dir: str | os.PathLike | None = None, vocab_size: int = 4096):
    """The cached tokenizer, checked against the sha256 recorded when it was written.

    Raises :class:`TinyStoriesError` if it is missing. A damaged one is rebuilt from the imported
    train split (with a DataWarning) when that split is there, and named with the command that
    rebuilds it otherwise.
    """
    check_vocab(vocab_size)
    path, meta_path = tok_paths(cache_dir, vocab_size)
    rebuild = (f"`sqs data fetch tinystories --from DIR --vocab-size {vocab_size}` (Python: "
               f"sqs.data.tinystories.prepare(vocab_size={vocab_size}))")
    if not path.exists():
        raise TinyStoriesError(f"{path}: no tokenizer yet. To fix: {rebuild}.")
    want = _read_meta(meta_path).get("tokenizer_sha256")
    if want is not None and sha256_file(path) != want:
        if (path.parent / "train.txt").exists():
            return train_tokenizer(cache_dir, vocab_size)  # warns, verifies the text, rebuilds
        raise TinyStoriesError(f"{path}: damaged (its sha256 differs from the one recorded in {meta_path.name}) "
                               f"and the imported text it was built from is gone. To fix: {rebuild}.")
    return _parse(path, f"rebuild it: {rebuild}")


# ---- copies elsewhere (an LM run's tokenizer.json) ------------------------------------------

def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def recorded_sha256(path: str | os.PathLike) -> str | None:
    """The sha256 recorded for a tokenizer copy (its ``<file>.sha256`` line), or None."""
    try:
        line = _sidecar(Path(path)).read_text().split()
    except OSError:
        return None
    return line[0] if line and len(line[0]) == 64 else None


def copy_tokenizer(src: str | os.PathLike, dest: str | os.PathLike) -> str:
    """Copy a tokenizer file to `dest` atomically and record its sha256 beside it
    (``<dest>.sha256``, `sha256sum -c` format); returns the sha256."""
    src, dest = Path(src), Path(dest)
    atomic_write(dest, lambda p: shutil.copyfile(src, p))
    sha = sha256_file(dest)
    write_text(_sidecar(dest), f"{sha}  {dest.name}\n")
    return sha


def verify_tokenizer_file(path: str | os.PathLike, sha256: str | None = None, *,
                          fix: str | None = None):
    """The tokenizer in `path` after checking it: its sha256 against `sha256` (default: the one
    recorded beside it by `copy_tokenizer`; a file without a record is only parsed), and that it
    parses. Raises TinyStoriesError, one line naming the file and `fix`."""
    path = Path(path)
    fix = fix or "restore it from a backup of the directory it belongs to"
    if not path.exists():
        raise TinyStoriesError(f"{path}: tokenizer file not found. To fix: {fix}.")
    want = sha256 or recorded_sha256(path)
    if want is not None:
        got = sha256_file(path)
        if got != want:
            raise TinyStoriesError(f"{path}: damaged tokenizer file (sha256 {got[:16]}..., recorded "
                                   f"{want[:16]}... when it was written). To fix: {fix}.")
    return _parse(path, fix)


def ensure_tokenizer_copy(dest: str | os.PathLike, cache_dir: str | os.PathLike | None = None,
                          vocab_size: int = 4096):
    """The tokenizer copy at `dest` (an LM run's ``tokenizer.json``), made, checked or repaired:

    * missing: copied from the cache's (checked) tokenizer, its sha256 recorded beside it;
    * intact: loaded;
    * damaged: copied again from the cache when the cache holds the same tokenizer (same sha256
      as recorded), with a DataWarning; otherwise a TinyStoriesError that names the file.

    A copy made before checksums existed is parsed and its sha256 recorded then.
    """
    dest = Path(dest)
    src, _ = tok_paths(cache_dir, vocab_size)
    if not dest.exists():
        load_tokenizer(cache_dir, vocab_size)  # checks (or rebuilds) the cache's copy first
        copy_tokenizer(src, dest)
        return verify_tokenizer_file(dest)
    want = recorded_sha256(dest)
    if want is None:
        tok = _parse(dest, "delete it to copy the cache's tokenizer again (only if the run was trained with it)")
        write_text(_sidecar(dest), f"{sha256_file(dest)}  {dest.name}\n")
        return tok
    if sha256_file(dest) == want:
        return _parse(dest, "restore it from a backup of the run directory")
    if src.exists() and sha256_file(src) == want:
        warnings.warn(f"{dest}: damaged (sha256 differs from {_sidecar(dest).name}); copied again from {src}",
                      DataWarning, stacklevel=2)
        copy_tokenizer(src, dest)
        return verify_tokenizer_file(dest)
    raise TinyStoriesError(f"{dest}: damaged tokenizer file (its sha256 differs from the one recorded in "
                           f"{_sidecar(dest).name}), and the cache has no tokenizer with that sha256 to copy "
                           f"again. To fix: restore {dest.name} from a backup of {dest.parent}.")
