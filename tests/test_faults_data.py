"""Data faults (issue 19, items 5, 6, 7 and the zero-record rule): caches that cannot be written,
damaged caches, empty data files and devices that do not exist.

* A cache that cannot be written (a file where its folder belongs, a read-only file system, a
  full disk) is one line naming the cache, the cause and `--cache-dir` / `$SQS_CACHE_DIR`; the
  command it advises is run here and must succeed.
* Every cached artifact carries a hash recorded when it was written and checked when it is read:
  the IDX files (md5 manifest), the TinyStories tokenizer (sha256 in its meta file), a tokenizer
  copy such as an LM run's tokenizer.json (sha256 beside it), the token files (sha256 in their
  side file). Damage is repaired where the source is at hand, else named with the repairing command.
* A data file with zero records is refused by name.
* `sqs.core.resolve_device` turns a --device value into a device that exists, or one line listing those that do.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import sqs.core
from sqs.cli import main
from sqs.data import images as im
from sqs.data import tinystories as ts
from sqs.data.cache import CacheError
from sqs.data.idx import IDXError, write_idx
from sqs.io import DataWarning

from conftest import TINY_VOCAB, write_image_dataset


pytestmark = pytest.mark.usefixtures("image_sources_off")  # no real source, no user cache


def one_line(capsys, *names: str) -> str:
    """The one `sqs: error:` line on stderr (progress lines may come before it), naming each of `names`."""
    out = capsys.readouterr().err
    errors = [ln for ln in out.splitlines() if ln.startswith("sqs: error:")]
    assert "Traceback" not in out and len(errors) == 1, out
    for n in names:
        assert n in errors[0], (n, errors[0])
    return errors[0]


def advised(message: str, **subst: str) -> list[str]:
    """The `sqs ...` command a message advises, as argv for sqs.cli.main, placeholders replaced."""
    m = re.search(r"`sqs (data fetch [^`]*)`", message)
    assert m, f"no command advised in: {message}"
    return [subst.get(a, a) for a in shlex.split(m.group(1))]


# ---- item 7: caches that cannot be written ------------------------------------------------

def test_fetch_into_a_cache_under_a_file_is_one_line_and_the_advised_command_works(tmp_path, capsys):
    src = write_image_dataset(tmp_path / "idx")
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder belongs")
    assert main(["data", "fetch", "mnist", "--data-dir", str(src), "--no-verify",
                 "--cache-dir", str(blocker / "cache")]) == 2
    err = one_line(capsys, "--cache-dir", "SQS_CACHE_DIR", str(blocker / "cache"), "not a directory")
    good = tmp_path / "writable"
    assert main(advised(err, DIR=str(good))) == 0
    assert im.load("mnist", "test", cache_dir=good)[0].shape[0] == 64


@pytest.mark.parametrize("code,cause", [(errno.EROFS, "read-only file system"), (errno.ENOSPC, "no space left"),
                                        (errno.EACCES, "permission denied")])
def test_an_os_error_writing_the_cache_is_one_line_with_its_cause(tmp_path, monkeypatch, capsys, code, cause):
    """The error at the boundary (the write into the cache) is mocked: as root chmod stops nothing."""
    src = write_image_dataset(tmp_path / "idx")
    cache = tmp_path / "cache"
    real_replace = os.replace

    def failing_replace(a, b, *args, **kw):
        if str(b).startswith(str(cache)):
            raise OSError(code, os.strerror(code), str(b))
        return real_replace(a, b, *args, **kw)

    monkeypatch.setattr(os, "replace", failing_replace)
    assert main(["data", "fetch", "mnist", "--data-dir", str(src), "--no-verify", "--cache-dir", str(cache)]) == 2
    err = one_line(capsys, "mnist dataset cache", cause, "--cache-dir DIR", "SQS_CACHE_DIR")
    monkeypatch.setattr(os, "replace", real_replace)
    assert main(advised(err, DIR=str(tmp_path / "other"))) == 0
    assert not list(cache.rglob("*.tmp")), "a failed write left a temporary file behind"


def test_plain_fetch_into_an_unwritable_cache_names_the_cache_before_any_source(tmp_path, monkeypatch, capsys):
    tried = []
    monkeypatch.setattr(im, "_sources", lambda info: tried.append(info.name) or [])
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["data", "fetch", "fashion-mnist", "--cache-dir", str(blocker / "c")]) == 2
    err = one_line(capsys, "--cache-dir", "fashion-mnist")
    assert "tried" not in err and tried == []


def test_a_cache_write_failure_stops_the_plain_fetch_at_once(tmp_path, monkeypatch, capsys):
    """A full disk while installing from the first source is the cause: no other source is tried."""
    src = write_image_dataset(tmp_path / "idx")
    calls = []

    def source(info, scratch, progress):
        calls.append(1)
        return src

    monkeypatch.setattr(im, "_sources", lambda info: [("first", source), ("second", source)])
    real = im.atomic_write

    def full(path, write):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(im, "atomic_write", full)
    with pytest.raises(CacheError, match="no space left on device.*--cache-dir"):
        im.fetch("mnist", cache_dir=tmp_path / "cache", progress=False, verify=False)
    assert calls == [1]
    monkeypatch.setattr(im, "atomic_write", real)


def test_tinystories_import_into_an_unwritable_cache_advises_a_command_that_works(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["data", "fetch", "tinystories", "--from", str(ts.sample_dir()), "--cache-dir",
                 str(blocker / "cache"), "--vocab-size", "0"]) == 2
    err = one_line(capsys, "--cache-dir", "SQS_CACHE_DIR", str(ts.sample_dir()))
    assert main(advised(err, DIR=str(tmp_path / "good"))) == 0
    capsys.readouterr()
    assert (tmp_path / "good" / "tinystories" / "train.txt").exists()


def _can_mount_read_only(tmp_path: Path) -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = tmp_path / "probe"
    probe.mkdir()
    script = f"mount --bind {probe} {probe} && mount -o remount,ro,bind {probe}"
    r = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True)
    return r.returncode == 0


_READ_ONLY = """
import sys
from sqs.cli import main
from sqs.data import images
ro, src = sys.argv[1:]
print("rc", main(["data", "fetch", "mnist", "--cache-dir", ro + "/cache", "--data-dir", src, "--no-verify"]))
print("rc", main(["data", "fetch", "mnist", "--cache-dir", ro + "/cache"]))
print("loaded", *images.load("mnist", "test", cache_dir=ro + "/full")[0].shape)
"""


def test_a_read_only_file_system_is_one_line_for_both_fetches(tmp_path):
    """A real read-only file system (a read-only bind mount in a private mount namespace), where
    the platform allows one; a complete cache on it is still read."""
    if not _can_mount_read_only(tmp_path):
        pytest.skip("cannot make a read-only mount here (needs unshare and mount rights)")
    src = write_image_dataset(tmp_path / "idx")
    ro = tmp_path / "ro"
    (ro / "cache" / "images").mkdir(parents=True)
    im.fetch("mnist", data_dir=src, cache_dir=ro / "full", progress=False, verify=False)
    script = (f"mount --bind {ro} {ro} && mount -o remount,ro,bind {ro} && "
              f"{shlex.quote(sys.executable)} -c {shlex.quote(_READ_ONLY)} {ro} {src}")
    r = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "SQS_CACHE_DIR": str(tmp_path / "unused")})
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("sqs: error:")]
    assert r.stdout.split() == ["rc", "2", "rc", "2", "loaded", "64", "784"], r.stdout + r.stderr
    assert "Traceback" not in r.stderr and len(lines) == 2, r.stderr
    for ln in lines:
        assert "read-only file system" in ln and "--cache-dir DIR" in ln and "tried" not in ln, ln
    assert "--data-dir" in lines[0] and "--data-dir" not in lines[1]


# ---- item 5: every cached artifact is checked like the weights -----------------------------

@pytest.fixture
def ts_cache(tmp_path):
    """A private copy of the imported, tokenized sample (the tests damage it)."""
    c = tmp_path / "ts-cache"
    ts.fetch(src=ts.sample_dir(), cache_dir=c, progress=False)
    ts.prepare(cache_dir=c, vocab_size=TINY_VOCAB, progress=False)
    return c


def _token_file(cache: Path, split: str = "train") -> Path:
    (path,) = (cache / "tinystories").glob(f"tokens-{split}-*.bin")
    return path


def _flip_tokens(path: Path, value=None) -> None:
    """Change some ids in place, keeping the size (and, unless `value`, the ids in range)."""
    data = np.fromfile(path, dtype=np.uint16)
    data[10:20] = data[10:20][::-1] if value is None else value
    data.tofile(path)


@pytest.mark.parametrize("value", [None, 65000], ids=["in-range ids", "out-of-range ids"])
def test_a_token_file_changed_in_place_is_found_and_encoded_again(ts_cache, value):
    path = _token_file(ts_cache)
    good = np.fromfile(path, dtype=np.uint16).copy()
    _flip_tokens(path, value)
    ts.token_cache._VERIFIED.clear()  # a new process
    with pytest.warns(DataWarning, match=r"damaged \(sha256"):
        toks = ts.encode_split("train", cache_dir=ts_cache, vocab_size=TINY_VOCAB, progress=False)
    np.testing.assert_array_equal(np.asarray(toks), good)


def test_an_empty_token_file_is_encoded_again(ts_cache):
    path = _token_file(ts_cache, "valid")
    meta_path = path.with_suffix(".json")
    good = np.fromfile(path, dtype=np.uint16).copy()
    path.write_bytes(b"")
    meta_path.write_text(json.dumps({**json.loads(meta_path.read_text()), "tokens": 0}))
    with pytest.warns(DataWarning, match="records 0 tokens"):
        stats = ts.split_stats("valid", cache_dir=ts_cache, vocab_size=TINY_VOCAB)
    assert stats["tokens"] == len(good)
    np.testing.assert_array_equal(np.fromfile(path, dtype=np.uint16), good)


def test_a_token_file_written_before_hashes_gets_one(ts_cache):
    meta_path = _token_file(ts_cache).with_suffix(".json")
    meta = json.loads(meta_path.read_text())
    sha = meta.pop("sha256")
    meta_path.write_text(json.dumps(meta))
    ts.token_cache._VERIFIED.clear()
    ts.verify_token_cache("train", cache_dir=ts_cache, vocab_size=TINY_VOCAB)
    assert json.loads(meta_path.read_text())["sha256"] == sha


def test_a_damaged_import_is_named_with_the_command_that_repairs_it(ts_cache, capsys):
    text = ts_cache / "tinystories" / "train.txt"
    data = bytearray(text.read_bytes())
    data[100] ^= 0x20  # same size, one letter's case
    text.write_bytes(bytes(data))
    _token_file(ts_cache).unlink()  # so the token file must be built again from the text
    with pytest.raises(ts.TinyStoriesError, match=r"train.txt: the imported train split is damaged") as e:
        ts.prepare(cache_dir=ts_cache, vocab_size=TINY_VOCAB, progress=False)
    assert main(advised(str(e.value), DIR=str(ts.sample_dir())) + ["--cache-dir", str(ts_cache),
                                                                    "--vocab-size", str(TINY_VOCAB)]) == 0
    capsys.readouterr()
    ts.prepare(cache_dir=ts_cache, vocab_size=TINY_VOCAB, progress=False)


def test_a_damaged_cache_tokenizer_is_rebuilt_from_the_text(ts_cache):
    path = ts_cache / "tinystories" / f"tokenizer-{TINY_VOCAB}.json"
    good = path.read_bytes()
    path.write_bytes(good[: len(good) // 2])  # truncated: "EOF while parsing" before
    with pytest.warns(DataWarning, match="damaged"):
        tok = ts.load_tokenizer(ts_cache, TINY_VOCAB)
    assert tok.token_to_id(ts.EOT) == 0
    assert path.read_bytes() == good  # BPE training is deterministic: the same file again


def test_verify_tokenizer_file_names_the_file(tmp_path, ts_cache):
    src = ts_cache / "tinystories" / f"tokenizer-{TINY_VOCAB}.json"
    copy = tmp_path / "run" / "tokenizer.json"
    copy.parent.mkdir()
    sha = ts.copy_tokenizer(src, copy)
    assert ts.recorded_sha256(copy) == sha
    assert ts.verify_tokenizer_file(copy).get_vocab_size() == TINY_VOCAB
    copy.write_bytes(copy.read_bytes()[:-40])
    with pytest.raises(ts.TinyStoriesError, match=rf"{re.escape(str(copy))}: damaged tokenizer file"):
        ts.verify_tokenizer_file(copy)
    copy.with_name("tokenizer.json.sha256").unlink()  # no record: the parse still names the file
    with pytest.raises(ts.TinyStoriesError, match=rf"{re.escape(str(copy))}: not a readable tokenizer file"):
        ts.verify_tokenizer_file(copy)


def test_a_run_tokenizer_copy_is_repaired_from_the_cache_or_named(tmp_path, ts_cache):
    run = tmp_path / "run"
    run.mkdir()
    dest = run / "tokenizer.json"
    tok = ts.ensure_tokenizer_copy(dest, ts_cache, TINY_VOCAB)  # made, hash recorded
    good = dest.read_bytes()
    dest.write_bytes(good[:100])
    with pytest.warns(DataWarning, match="copied again"):
        again = ts.ensure_tokenizer_copy(dest, ts_cache, TINY_VOCAB)
    assert dest.read_bytes() == good and again.encode("Once").ids == tok.encode("Once").ids
    dest.write_bytes(good[:100])
    other = tmp_path / "other-cache"  # a cache whose tokenizer is not the run's
    shutil.copytree(ts_cache, other)
    (other / "tinystories" / f"tokenizer-{TINY_VOCAB}.json").write_text("{}")
    with pytest.raises(ts.TinyStoriesError, match="restore tokenizer.json from a backup"):
        ts.ensure_tokenizer_copy(dest, other, TINY_VOCAB)


def test_a_damaged_idx_cache_is_found_and_the_advised_fetch_repairs_it(tmp_path, monkeypatch, capsys):
    src = write_image_dataset(tmp_path / "idx")
    cache = tmp_path / "cache"
    im.fetch("mnist", data_dir=src, cache_dir=cache, progress=False, verify=False)
    f = cache / "images" / "mnist" / im.TRAIN_IMAGES
    data = bytearray(f.read_bytes())
    data[5000] ^= 0x01  # one pixel: the file is still a valid IDX file
    f.write_bytes(bytes(data))
    with pytest.raises(IDXError, match="the cached file is damaged") as e:
        im.load("mnist", "train", cache_dir=cache)
    assert main(advised(str(e.value), DIR=str(src))) == 0  # a modified copy: --data-dir DIR --no-verify
    capsys.readouterr()
    assert im.load("mnist", "train", cache_dir=cache)[0].shape == (256, 784)


def test_a_damaged_cache_of_the_originals_advises_the_plain_fetch(tmp_path, monkeypatch):
    src = write_image_dataset(tmp_path / "idx")
    cache = tmp_path / "cache"
    im.fetch("mnist", data_dir=src, cache_dir=cache, progress=False, verify=False)
    manifest = cache / "images" / "mnist" / im.MANIFEST
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "originals": True}))
    f = cache / "images" / "mnist" / im.TEST_LABELS
    f.write_bytes(f.read_bytes()[:-1] + bytes([(f.read_bytes()[-1] + 1) % 10]))
    with pytest.raises(IDXError, match=rf"To repair: `sqs data fetch mnist --cache-dir {re.escape(str(cache))}`"):
        im.load("mnist", "test", cache_dir=cache)


def test_a_cache_without_a_manifest_is_checked_against_the_originals(tmp_path):
    """Filled before manifests existed: the known md5 of the original files is the record."""
    cache = tmp_path / "cache"
    folder = write_image_dataset(cache / "images" / "mnist")  # placed by hand, no manifest
    with pytest.raises(IDXError, match=r"the original file's 6bbc9ace.*`sqs data fetch mnist --cache-dir .*"
                                       r"or, for a modified copy of your own.*--no-verify"):
        im.load("mnist", "train", cache_dir=cache)
    assert im.load("mnist", "train", data_dir=folder)[0].shape == (256, 784)  # a folder of your own: as it is


# ---- a data file with zero records is refused by name -------------------------------------

def test_an_idx_file_with_zero_images_is_refused_by_name(tmp_path):
    folder = write_image_dataset(tmp_path / "idx")
    write_idx(folder / "t10k-images-idx3-ubyte", np.zeros((0, 28, 28), np.uint8))
    write_idx(folder / "t10k-labels-idx1-ubyte", np.zeros((0,), np.uint8))
    with pytest.raises(IDXError, match=r"t10k-images-idx3-ubyte: holds 0 images"):
        im.load("mnist", "test", data_dir=folder)
    with pytest.raises(IDXError, match=r"t10k-images-idx3-ubyte: holds 0 images"):
        im.fetch("mnist", data_dir=folder, cache_dir=tmp_path / "c", progress=False, verify=False)


def test_a_tinystories_file_without_stories_is_refused_by_name(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(ts.sample_dir() / "train-sample.txt.gz", src)
    (src / "blank-train.txt").write_text(f"\n{ts.EOT}\n   \n{ts.EOT}\n")
    with pytest.raises(ts.TinyStoriesError, match=r"blank-train.txt: holds no stories"):
        ts.import_corpus(src, cache_dir=tmp_path / "c", progress=False)
    (src / "blank-train.txt").write_text("")
    with pytest.raises(ts.TinyStoriesError, match=r"blank-train.txt: empty file"):
        ts.import_corpus(src, cache_dir=tmp_path / "c", progress=False)


# ---- item 6: devices -----------------------------------------------------------------------

def test_devices_that_exist_resolve():
    assert sqs.core.resolve_device("cpu") == torch.device("cpu")
    assert sqs.core.resolve_device(torch.device("cpu")) == torch.device("cpu")
    assert sqs.core.resolve_device("auto") == sqs.core.resolve_device(None)
    assert "cpu" in sqs.core.available_devices()


@pytest.mark.parametrize("name,match", [
    ("banana", r"--device banana: not a device name; available here: cpu"),
    ("cuda:x", r"--device cuda:x: not a device name; available here: cpu"),
    ("", r"--device : not a device name"),
])
def test_a_device_that_is_not_a_name_lists_the_available_ones(name, match):
    with pytest.raises(sqs.core.DeviceError, match=match):
        sqs.core.resolve_device(name)


def test_cuda_without_cuda_lists_the_available_devices(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", None)
    with pytest.raises(sqs.core.DeviceError, match=r"--device cuda: this torch build has no CUDA support; "
                                                  r"available here: cpu"):
        sqs.core.resolve_device("cuda")
    monkeypatch.setattr(torch.version, "cuda", "12.4")
    with pytest.raises(sqs.core.DeviceError, match="no CUDA GPU is visible"):
        sqs.core.resolve_device("cuda:0")


def test_a_gpu_index_past_the_last_lists_the_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(sqs.core.DeviceError, match=r"there is no cuda:7 \(1 GPU\(s\)\); available here: cpu, cuda:0"):
        sqs.core.resolve_device("cuda:7")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert sqs.core.resolve_device("cuda") == torch.device("cuda", 0)


def test_device_errors_are_user_errors_and_a_non_string_is_named():
    assert issubclass(sqs.core.DeviceError, sqs.io.UserError)
    with pytest.raises(TypeError, match="`device` must be a string"):
        sqs.core.resolve_device(3)
    if "mps" not in sqs.core.available_devices():
        with pytest.raises(sqs.core.DeviceError, match="--device mps: not available here"):
            sqs.core.resolve_device("mps")
