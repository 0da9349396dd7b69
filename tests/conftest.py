"""Fixtures shared by the test modules."""

from __future__ import annotations

from pathlib import Path

from typing import Callable

import pytest
import torch

import sqs


@pytest.fixture
def eager_backend():
    """Run the test with the fused SQS-GLU on its eager backend (no torch.compile: fast start,
    same values); the previous backend is restored afterwards."""
    with sqs.ops.backend("eager"):
        yield "eager"


@pytest.fixture
def glu_pair() -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """Factory of a seeded (w, v) pair that requires grad, with v kept off the gate's jump at 0
    (so finite differences in gradcheck do not straddle it)."""

    def make(shape=(3, 7), seed: int = 0, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(shape, generator=g, dtype=dtype)
        v = torch.randn(shape, generator=g, dtype=dtype) * 2
        v = torch.where(v.abs() < 1e-2, v + 0.05, v)
        return w.requires_grad_(), v.requires_grad_()

    return make


#: Vocabulary of the tiny BPE tokenizer the LM tests train on the shipped TinyStories sample.
TINY_VOCAB = 300


@pytest.fixture(scope="session")
def tinystories_cache(tmp_path_factory) -> Path:
    """A cache holding the shipped TinyStories sample, imported and tokenized once per session
    (vocabulary TINY_VOCAB), for every test that builds a tiny language-model run."""
    from sqs.data import tinystories as ts

    c = tmp_path_factory.mktemp("tinystories-cache")
    ts.fetch(src=ts.sample_dir(), cache_dir=c, progress=False)
    ts.prepare(cache_dir=c, vocab_size=TINY_VOCAB, progress=False)
    return c


@pytest.fixture
def image_sources_off(tmp_path, monkeypatch):
    """No test reaches a real fetch source (npm, apt, mirrors) or the user's cache; the in-memory
    image cache is cleared before and after."""
    from sqs.data import images as im

    monkeypatch.setenv("SQS_CACHE_DIR", str(tmp_path / "default-cache"))

    def no_sources(info):
        raise AssertionError("test tried an automatic fetch source")

    monkeypatch.setattr(im, "_sources", no_sources)
    im.clear_memory_cache()
    yield
    im.clear_memory_cache()


#: Sizes of the tiny image dataset `write_image_dataset` makes.
IMG_TRAIN, IMG_TEST = 256, 64


def write_image_dataset(folder: Path, seed: int = 0) -> Path:
    """Four IDX files of a learnable 10-class problem (a fixed template per class plus noise),
    IMG_TRAIN training and IMG_TEST test images, for the image-experiment tests."""
    import numpy as np

    from sqs.data.idx import write_idx

    rng = np.random.default_rng(seed)
    templates = rng.uniform(0, 255, size=(10, 28, 28))
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", IMG_TRAIN), ("t10k", IMG_TEST)):
        labels = rng.integers(0, 10, size=n).astype(np.uint8)
        imgs = np.clip(0.6 * templates[labels] + rng.normal(0, 40, size=(n, 28, 28)), 0, 255).astype(np.uint8)
        write_idx(folder / f"{split}-images-idx3-ubyte", imgs)
        write_idx(folder / f"{split}-labels-idx1-ubyte", labels)
    return folder


def fill_image_cache(cache: Path, name: str = "mnist", seed: int = 0) -> Path:
    """The tiny dataset installed in the cache `cache` the way `sqs data fetch NAME --data-dir DIR
    --no-verify` installs a modified copy (md5s recorded, so load() checks them); returns its folder."""
    from sqs.data import images

    src = write_image_dataset(cache.parent / f"{cache.name}-{name}-src", seed)
    return images.fetch(name, data_dir=src, cache_dir=cache, progress=False, verify=False)
