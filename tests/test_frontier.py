"""The seed split (init vs data seed) and the frontier grid, on tiny synthetic data."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from sqs.experiments.frontier import Grid, load_grid, plan_frontier, run_frontier
from sqs.experiments.frontier_analysis import saturation_share
from sqs.experiments.frontier_report import conclusion, rerender, write_report
from sqs.runs.config_files import config_names
from sqs.runs.image_config import ImageRunConfig, load_config
from sqs.runs.image_pipeline import ImageTask, build_model
from sqs.runs.naming import run_name
from sqs.training.rundir import FRONTIER_ANALYSIS

from conftest import IMG_TRAIN as N_TRAIN  # noqa: E402
from conftest import fill_image_cache, write_image_dataset as _write_dataset  # noqa: E402
TINY = ["batch_size=32", "model.d_model=8", "model.d_hidden=8", "early_eval_every=0", "eval_points=2",
        "noise_std=0.3", "noise_relative=false", "train.lr=1e-2"]




# ----------------------------------------------------------------------------- seed split


def _task(cfg: ImageRunConfig) -> ImageTask:
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(N_TRAIN, 784, generator=g), torch.randint(0, 10, (N_TRAIN,), generator=g)
    return ImageTask(x, y, x[:8], y[:8], 32, seed=cfg.batch_seed, noise_std=0.3)


def test_unsplit_config_is_unchanged_and_split_seeds_name_the_run():
    cfg = load_config("sec41", ["seed=2"])
    assert "init_seed" not in cfg.to_dict() and "data_seed" not in cfg.to_dict()  # config.json as before
    assert cfg.run_name() == "sqs-s2" and (cfg.model_seed, cfg.batch_seed) == (2, 2)
    same = load_config("sec41", ["seed=2", "init_seed=2", "data_seed=2"])  # equal to seed: the unsplit run
    assert same.to_dict() == cfg.to_dict() and same.run_name() == "sqs-s2"
    split = load_config("sec41", ["seed=0", "data_seed=1"])
    assert split.run_name() == "sqs-i0-d1" and split.to_dict()["data_seed"] == 1
    assert ImageRunConfig.from_dict(split.to_dict()) == split
    tagged = load_config("sec41", ["seed=0", "data_seed=1", "model.gate_kwargs.lam=0.1"])
    assert tagged.run_dir("r") == Path("r/sec41/mnist/sqs-lam0.1-i0-d1")
    assert run_name("sqs", 0, gate_kwargs={"c": 0.01, "lam": 0.5, "p": 2.0}) == "sqs-p2-s0"  # defaults dropped
    with pytest.raises(ValueError, match="init_seed"):
        load_config("sec41", ["init_seed=-1"])


def test_init_seed_fixes_the_weights_and_data_seed_the_batches():
    base = load_config("sec41", ["seed=0"])
    split = load_config("sec41", ["seed=0", "data_seed=1"])
    other_init = load_config("sec41", ["seed=1", "init_seed=0"])
    w0 = build_model(base).state_dict()
    for cfg in (split, other_init):  # same init seed: identical initial weights
        assert all(torch.equal(w0[k], v) for k, v in build_model(cfg).state_dict().items())
    assert not torch.equal(w0["embed.weight"], build_model(load_config("sec41", ["seed=1"])).state_dict()["embed.weight"])
    xb, _ = _task(base).batch(0)
    xs, _ = _task(split).batch(0)
    xo, _ = _task(load_config("sec41", ["seed=1"])).batch(0)
    assert not torch.allclose(xb, xs)  # other data seed: other batch and noise ...
    assert torch.equal(xs, xo)  # ... the batches of the run whose (data) seed it is
    assert split.train_config(60000).seed == 1


# ----------------------------------------------------------------------------- the grid


def test_shipped_grid_expands_to_the_designed_runs():
    grid = load_grid()
    specs = plan_frontier("runs", grid)
    one = [s for s in specs if s.layers == 1]
    two = [s for s in specs if s.layers == 2]
    assert len(grid.sqs_settings()) == 11 and len(grid.settings()) == 14
    assert len(one) == 14 * 2 * 3 + 2 * 2 * 2 and len(two) == 10 * 2 * 2
    assert len({s.run_dir for s in specs}) == len(specs) and len({s.name for s in specs}) == len(specs)
    dirs = {str(s.run_dir) for s in specs}
    for d in ("runs/sec41/mnist/sqs-s0", "runs/sec41/fashion-mnist/bilinear-s2", "runs/sec41/mnist/sqs-lam0-s1",
              "runs/sec41/mnist/sqs-c0.1-s0", "runs/sec41/mnist/sqs-p0.5-s2", "runs/sec41/mnist/bilinear-i0-d1",
              "runs/sec41/fashion-mnist/sqs-i1-d2", "runs/sec42/mnist/sqs-lam2-s1", "runs/sec41/mnist/gelu-s0"):
        assert d in dirs, d
    assert not any(s.setting.is_default or s.setting.gate != "sqs" for s in two)  # references come from Table 1
    # the default-gate runs are the spectra experiment's (same config, same directory)
    spectra_cfg = load_config("sec41", {"dataset": "mnist", "model.gate": "sqs", "seed": 0, "epochs": 20})
    first = next(s for s in specs if str(s.run_dir) == "runs/sec41/mnist/sqs-s0")
    assert first.cfg.to_dict() == spectra_cfg.to_dict()
    assert specs[0].seed == 0 and (specs[-1].init_seed, specs[-1].data_seed) == (1, 2)  # priority order: seed 0 first
    assert "frontier" not in config_names("image")  # a grid, not a run config


def _tiny_grid(tmp_path: Path) -> Grid:
    text = """
[grid]
datasets = ["mnist"]
references = ["bilinear", "gelu"]
[grid.sqs]
lam = [0, 2]
[grid.one_layer]
config = "sec41"
seeds = [0, 1]
split = [[0, 1]]
split_gates = ["bilinear", "sqs"]
[grid.two_layer]
config = "sec42"
seeds = [0]
[analysis]
k = 3
fit_train_images = 128
fit_seeds = [0]
r2_min = 0.95
"""
    path = tmp_path / "tiny-grid.toml"
    path.write_text(text)
    return load_grid(path)


def test_tiny_frontier_end_to_end_resumes_and_reports(tmp_path, eager_backend, no_figures):
    cache = tmp_path / "cache"
    fill_image_cache(cache)
    runs, out, log = tmp_path / "runs", tmp_path / "out", tmp_path / "frontier.log"
    grid = _tiny_grid(tmp_path)
    specs = plan_frontier(runs, grid, epochs=1, overrides=TINY)
    assert len(specs) == 5 * 2 + 2 + 2  # 5 settings x 2 seeds, 2 same-init baselines, 2 two-layer runs
    s1 = run_frontier(specs, workers=1, cache_dir=cache, log=log, progress=False)
    assert s1["n_trained"] == len(specs) and not s1["failed"]
    lines = log.read_text().splitlines()
    assert len([x for x in lines if "] sec4" in x]) == len(specs) and "ETA" in lines[1] and lines[-1].split()[2] == "end:"
    s2 = run_frontier(specs, workers=1, cache_dir=cache, log=log, progress=False)
    assert s2["n_trained"] == 0 and s2["n_skipped"] == len(specs)  # resumed: nothing retrained

    paths = write_report(runs, out, grid, epochs=1, overrides=TINY, cache_dir=cache, table1_json=None)
    names = {p.name for p in paths}
    assert {"table.md", "frontier.json", "accuracy_vs_fidelity.png", "agreement_vs_lambda.png"} <= names
    doc = json.loads((out / "frontier.json").read_text())
    row = doc["aggregate"]["1"]["mnist"]["sqs-lam2"]
    assert row["seeds"] == [0, 1] and 0 <= row["saturation"][0]["mean"] <= 1
    assert set(row["fidelity"]) == {"first-order", "gain", "fit"}  # fit: seed 0 only
    assert row["fidelity"]["fit"]["logit_r2"]["n"] == 1 and row["fidelity"]["gain"]["logit_r2"]["n"] == 2
    assert row["agreement"]["gain"]["n_pairs"] == 2
    assert doc["aggregate"]["1"]["mnist"]["bilinear"]["exact"] is True
    assert doc["aggregate"]["1"]["mnist"]["gelu"].get("fidelity") is None
    assert "bilinear_same_init" in doc["baselines"]["mnist"]["gain"]
    md = (out / "table.md").read_text()
    assert "## Conclusion" in md and "Recommended setting" in md and "## MNIST, 2 layers" in md
    # analysis is cached next to each run: a second report recomputes nothing
    cached = {s.run_dir: (s.run_dir / FRONTIER_ANALYSIS).stat().st_mtime_ns for s in specs}
    write_report(runs, out, grid, epochs=1, overrides=TINY, cache_dir=cache, table1_json=None, workers=2)
    assert all((d / FRONTIER_ANALYSIS).stat().st_mtime_ns == t for d, t in cached.items())
    # the report is re-made from its frontier.json alone, identical, once the runs are gone
    before = (out / "table.md").read_text()
    (out / "table.md").unlink()
    shutil.rmtree(runs)
    rerender(out, grid)
    assert (out / "table.md").read_text() == before


def _row(key, lam, acc, r2, ranks, overlap, gate="sqs"):
    return {"setting": key, "label": f"SQS λ={lam}" if gate == "sqs" else gate, "gate": gate, "c": 0.01, "lam": lam,
            "p": 1.0, "seeds": [0], "test_acc": {"mean": acc, "std": 0, "n": 1},
            "fidelity": {"gain": {"logit_r2": {"mean": r2}}}, "reading": "gain",
            "agreement": {"gain": {"positive_per_rank": ranks, "positive_overlap": {"mean": overlap}}}}


def test_conclusion_follows_the_numbers():
    fig2 = {"cos_min": 0.5, "cos_top": 0.95}
    base = {"mnist": {"gain": {"bilinear_same_init": {"positive": {"overlap": 0.6}}}}}
    good = {1: {"mnist": {"sqs": _row("sqs", 0.5, 0.96, 0.97, [0.96, 0.8, 0.7], 0.7),
                          "sqs-lam2": _row("sqs-lam2", 2.0, 0.97, 0.90, [0.4, 0.3, 0.2], 0.3)}}}
    lines, facts = conclusion(good, base, fig2, 0.05, 0.95)
    assert facts["claims"]["mnist"]["gain"]["sqs"]["holds"] and "it holds (" in lines[0]
    assert facts["recommendation"]["setting"] == "sqs"  # lam2 is more accurate but fails R² and agreement
    bad = {1: {"mnist": {"sqs": _row("sqs", 0.5, 0.96, 0.97, [0.6, 0.45, 0.3], 0.5),
                         "sqs-lam2": _row("sqs-lam2", 2.0, 0.97, 0.96, [0.4, 0.3, 0.2], 0.3)}}}
    lines2, facts2 = conclusion(bad, base, fig2, 0.05, 0.95)
    assert not facts2["claims"]["mnist"]["gain"]["sqs"]["holds"] and "does not hold" in lines2[0]
    assert facts2["recommendation"]["setting"] == "sqs-lam2" and "no setting also matched" in facts2["recommendation"]["criterion"]
    assert lines != lines2


def test_saturation_share_counts_gate_inputs_beyond_one_over_lambda(eager_backend):
    from sqs.models.image import ImageClassifier, ImageModelConfig

    torch.manual_seed(0)
    img = torch.rand(50, 784)
    for n_layers, kw in ((1, {"lam": 2.0}), (2, {"lam": 0.25}), (1, {"lam": 0.0})):
        m = ImageClassifier(ImageModelConfig(n_layers=n_layers, d_model=8, d_hidden=8, gate="sqs", gate_kwargs=kw))
        with torch.no_grad():
            x, want = m.embed(img), []
            for layer in m.layers:
                v = x @ layer.V.T
                want.append(float((v.abs() > 1 / kw["lam"]).double().mean()) if kw["lam"] > 0 else None)
                x = layer(x)
        got = saturation_share(m, img, batch_size=7)  # batches: counts add up
        assert got == pytest.approx(want) if kw["lam"] > 0 else got == [None]
    bil = ImageClassifier(ImageModelConfig(n_layers=1, d_model=8, d_hidden=8, gate="bilinear"))
    assert saturation_share(bil, img) == [None]
