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
#: A language-model config of a few seconds on that tokenizer (written to a .toml by the tests).
TINY_LM_TOML = """
name = "tiny"
[model]
n_layers = 1
d_model = 16
n_heads = 2
d_hidden = 16
context = 16
[data]
vocab_size = 300
[train]
batch_size = 4
steps = 4
lr = 3e-3
grad_clip = 1.0
[eval]
eval_every = 2
eval_windows = 8
eval_batch = 8
"""


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


@pytest.fixture
def no_figures(monkeypatch):
    """The reports' figures (`sqs.interp.plots`) as signature-checked stubs, and an instant save for
    them and for the reports that save their own: for tests of what a command does around its report
    (matplotlib is slow on 2 shared cores)."""
    import inspect

    import matplotlib.pyplot as plt

    from sqs.interp import plots

    def stub(fn):
        def build(*args, **kwargs):
            inspect.signature(fn).bind(*args, **kwargs)  # the call would be valid
            return plt.figure()
        return build

    def fast_save(fig, path, dpi=None):
        plt.close(fig)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_bytes(b"png")
        return Path(path)

    for name in ("plot_spectrum", "plot_eigenvector_grid", "plot_comparison_grid", "plot_cosine_per_rank",
                 "plot_explanation", "plot_truncation"):
        monkeypatch.setattr(plots, name, stub(getattr(plots, name)))
    monkeypatch.setattr(plots, "save", fast_save)
    from sqs.experiments import frontier_plots, lm_spectra_report, lm_table_report, table1_report

    for module in (table1_report, lm_table_report, lm_spectra_report):  # reports that save through sqs.io
        monkeypatch.setattr(module, "save_figure", fast_save)
    monkeypatch.setattr(frontier_plots, "save", fast_save)


def fill_image_cache(cache: Path, name: str = "mnist", seed: int = 0) -> Path:
    """The tiny dataset installed in the cache `cache` the way `sqs data fetch NAME --data-dir DIR
    --no-verify` installs a modified copy (md5s recorded, so load() checks them); returns its folder."""
    from sqs.data import images

    src = write_image_dataset(cache.parent / f"{cache.name}-{name}-src", seed)
    return images.fetch(name, data_dir=src, cache_dir=cache, progress=False, verify=False)
