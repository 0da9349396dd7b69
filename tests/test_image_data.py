"""MNIST / Fashion-MNIST fetch and load, on small IDX files written by the tests (no network)."""

from __future__ import annotations

import hashlib
import shutil

import numpy as np
import pytest
import torch

from sqs.data import images as im
from sqs.data.idx import IDXError, encode_idx, write_idx

N_TRAIN, N_TEST = 300, 100


def _arrays(seed=0, n_train=N_TRAIN, n_test=N_TEST):
    rng = np.random.default_rng(seed)
    return {
        im.TRAIN_IMAGES: rng.integers(0, 256, size=(n_train, 28, 28), dtype=np.uint8),
        im.TRAIN_LABELS: rng.integers(0, 10, size=n_train, dtype=np.uint8),
        im.TEST_IMAGES: rng.integers(0, 256, size=(n_test, 28, 28), dtype=np.uint8),
        im.TEST_LABELS: rng.integers(0, 10, size=n_test, dtype=np.uint8),
    }


def _write(folder, arrays, gz=False):
    folder.mkdir(parents=True, exist_ok=True)
    for name, a in arrays.items():
        write_idx(folder / (name + (".gz" if gz else "")), a, gzip=gz)
    return folder


pytestmark = pytest.mark.usefixtures("image_sources_off")  # no real source, no user cache


@pytest.fixture
def known_md5(monkeypatch):
    """Make the tests' small files the 'known' ones for mnist (checksums verified as for real data)."""
    arrays = _arrays()
    md5 = {k: hashlib.md5(encode_idx(a)).hexdigest() for k, a in arrays.items()}
    monkeypatch.setitem(im.DATASETS, "mnist", im.ImageDataset(**{**im.DATASETS["mnist"].__dict__, "md5": md5}))
    return arrays


def test_datasets_table():
    assert set(im.DATASETS) == {"mnist", "fashion-mnist"}
    for info in im.DATASETS.values():
        assert set(info.md5) == set(im.FILES)
        assert all(len(v) == 32 for v in info.md5.values())
    assert im.DATASETS["mnist"].md5[im.TRAIN_IMAGES] == "6bbc9ace898e44ae57da46a324031adb"


@pytest.mark.parametrize("gz", [False, True])
def test_load_with_data_dir(tmp_path, gz):
    arrays = _arrays()
    d = _write(tmp_path / "idx", arrays, gz=gz)
    x, y = im.load("mnist", "train", data_dir=d)
    assert x.shape == (N_TRAIN, 784) and x.dtype == torch.float32
    assert y.shape == (N_TRAIN,) and y.dtype == torch.int64
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    np.testing.assert_allclose(x[5].numpy(), arrays[im.TRAIN_IMAGES][5].reshape(-1) / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(y.numpy(), arrays[im.TRAIN_LABELS])
    xt, yt = im.load("mnist", "test", data_dir=d)
    assert xt.shape == (N_TEST, 784) and yt.shape == (N_TEST,)
    # memory cache: the same tensors come back
    x2, y2 = im.load("mnist", "train", data_dir=d)
    assert x2 is x and y2 is y


def test_load_rereads_after_file_changes(tmp_path):
    d = _write(tmp_path / "idx", _arrays(0))
    x, _ = im.load("mnist", "train", data_dir=d)
    _write(d, {im.TRAIN_IMAGES: _arrays(1, n_train=50)[im.TRAIN_IMAGES], im.TRAIN_LABELS: np.zeros(50, np.uint8)})
    x2, y2 = im.load("mnist", "train", data_dir=d)
    assert x2.shape == (50, 784) and int(y2.sum()) == 0


def test_load_bad_args(tmp_path):
    with pytest.raises(ValueError, match="unknown image dataset"):
        im.load("cifar", "train", data_dir=tmp_path)
    with pytest.raises(ValueError, match="unknown split"):
        im.load("mnist", "val", data_dir=tmp_path)


def test_load_missing_files_says_how_to_fetch(tmp_path):
    with pytest.raises(im.DatasetMissingError) as ei:
        im.load("fashion-mnist", "test", cache_dir=tmp_path / "cache")
    msg = str(ei.value)
    assert "sqs data fetch fashion-mnist" in msg and "--data-dir" in msg and "t10k-images-idx3-ubyte" in msg
    with pytest.raises(FileNotFoundError, match="--data-dir"):
        im.load("mnist", "train", data_dir=tmp_path / "empty")


def test_label_count_mismatch(tmp_path):
    arrays = _arrays()
    arrays[im.TRAIN_LABELS] = arrays[im.TRAIN_LABELS][:299]
    d = _write(tmp_path / "idx", arrays)
    with pytest.raises(IDXError) as ei:
        im.load("mnist", "train", data_dir=d)
    msg = str(ei.value)
    assert "300 images" in msg and "299 labels" in msg
    assert str(d / im.TRAIN_IMAGES) in msg and str(d / im.TRAIN_LABELS) in msg and "To fix" in msg


def test_labels_out_of_range(tmp_path):
    arrays = _arrays()
    arrays[im.TEST_LABELS][[3, 7]] = 10
    d = _write(tmp_path / "idx", arrays)
    with pytest.raises(IDXError, match=r"2 labels outside 0\.\.9") as ei:
        im.load("mnist", "test", data_dir=d)
    assert str(d / im.TEST_LABELS) in str(ei.value)


def test_wrong_image_dims(tmp_path):
    arrays = _arrays()
    arrays[im.TRAIN_IMAGES] = np.zeros((N_TRAIN, 32, 32), np.uint8)
    d = _write(tmp_path / "idx", arrays)
    with pytest.raises(IDXError, match="N x 28 x 28"):
        im.load("mnist", "train", data_dir=d)


def test_corrupt_file_message_names_fetch(tmp_path, known_md5):
    cache = tmp_path / "cache"
    im.fetch("mnist", data_dir=_write(tmp_path / "idx", known_md5), cache_dir=cache, progress=False)
    f = cache / "images" / "mnist" / im.TEST_IMAGES
    f.write_bytes(f.read_bytes()[:-5])
    with pytest.raises(IDXError, match=r"truncated data.*re-run `sqs data fetch mnist --cache-dir "):
        im.load("mnist", "test", cache_dir=cache)


def test_fetch_with_data_dir_then_load_from_cache(tmp_path, known_md5):
    src = _write(tmp_path / "idx", known_md5, gz=True)
    cache = tmp_path / "cache"
    out = im.fetch("mnist", data_dir=src, cache_dir=cache, progress=False)
    assert out == cache / "images" / "mnist"
    assert sorted(p.name for p in out.iterdir()) == sorted(im.FILES + (im.MANIFEST,))  # uncompressed, md5s recorded
    for name, a in known_md5.items():
        assert (out / name).read_bytes() == encode_idx(a)
    shutil.rmtree(src)  # the second load must come from the cache
    x, y = im.load("mnist", "train", cache_dir=cache)
    assert x.shape == (N_TRAIN, 784)
    np.testing.assert_array_equal(y.numpy(), known_md5[im.TRAIN_LABELS])
    # a verified cache is reused without touching any source (_sources raises in these tests)
    assert im.fetch("mnist", cache_dir=cache, progress=False) == out


def test_fetch_checksum_mismatch(tmp_path, known_md5):
    arrays = dict(known_md5)
    arrays[im.TRAIN_LABELS] = (arrays[im.TRAIN_LABELS] + 1) % 10  # valid IDX, wrong content
    src = _write(tmp_path / "idx", arrays)
    cache = tmp_path / "cache"
    with pytest.raises(IDXError) as ei:
        im.fetch("mnist", data_dir=src, cache_dir=cache, progress=False)
    msg = str(ei.value)
    assert str(src / im.TRAIN_LABELS) in msg and "md5" in msg and "expected" in msg
    assert not (cache / "images" / "mnist" / im.TRAIN_IMAGES).exists()  # nothing half-installed
    # verify=False accepts a deliberately modified copy
    im.fetch("mnist", data_dir=src, cache_dir=cache, progress=False, verify=False)
    assert (cache / "images" / "mnist" / im.TRAIN_LABELS).exists()


def test_fetch_data_dir_missing_file(tmp_path, known_md5):
    src = _write(tmp_path / "idx", known_md5)
    (src / im.TEST_LABELS).unlink()
    with pytest.raises(im.DatasetMissingError, match=im.TEST_LABELS):
        im.fetch("mnist", data_dir=src, cache_dir=tmp_path / "cache", progress=False)


def test_fetch_tries_sources_in_order_and_reports_all(tmp_path, known_md5, monkeypatch):
    good = _write(tmp_path / "good", known_md5)
    calls = []

    def broken(info, scratch, progress):
        calls.append("broken")
        raise RuntimeError("no such tool")

    def wrong(info, scratch, progress):
        calls.append("wrong")
        return _write(scratch / "w", _arrays(seed=5))  # valid IDX, wrong checksums

    def ok(info, scratch, progress):
        calls.append("ok")
        return good

    monkeypatch.setattr(im, "_sources", lambda info: [("A", broken), ("B", wrong), ("C", ok)])
    cache = tmp_path / "cache"
    assert im.fetch("mnist", cache_dir=cache, progress=False) == cache / "images" / "mnist"
    assert calls == ["broken", "wrong", "ok"]

    monkeypatch.setattr(im, "_sources", lambda info: [("A", broken), ("B", wrong)])
    with pytest.raises(im.FetchError) as ei:
        im.fetch("mnist", cache_dir=cache, force=True, progress=False)
    msg = str(ei.value)
    assert "A: RuntimeError: no such tool" in msg and "B: IDXError" in msg and "md5" in msg
    assert "--data-dir" in msg


def test_system_and_mirror_sources_offline(tmp_path, known_md5, monkeypatch):
    """The system-folder and HTTP-mirror code paths, pointed at local folders (file:// URL)."""
    info = im.DATASETS["mnist"]
    sysdir = _write(tmp_path / "usr-share", known_md5, gz=True)
    assert im._from_system(im.ImageDataset(**{**info.__dict__, "system_dirs": (str(sysdir),)}), tmp_path, False) == sysdir
    mirror = _write(tmp_path / "mirror", known_md5, gz=True)
    minfo = im.ImageDataset(**{**info.__dict__, "mirrors": ("file:///nonexistent/", mirror.as_uri() + "/")})
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    got = im._from_mirrors(minfo, scratch, False)
    assert im._verify_folder(minfo, got, True, "x").keys() == set(im.FILES)
