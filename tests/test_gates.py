"""The gate benchmark (`sqs experiment gates`): the Pareto front and the verdict on known numbers, the
choice of a cell's best reading, and the whole command on a tiny grid (resumable, analyses cached,
Bilinear read exactly at every depth)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sqs.cli import main
from sqs.experiments.gates_report import aggregate, pareto_front, panel_verdict

from conftest import TINY_LM_TOML, fill_image_cache

pytestmark = pytest.mark.usefixtures("eager_backend")


# ----------------------------------------------------------------------------- the verdict on known numbers


def test_the_pareto_front_keeps_exactly_the_undominated_points():
    pts = {"a": (0.30, 0.90), "b": (0.35, 0.95), "c": (0.32, 0.80), "d": (0.40, 0.95), "e": (0.30, 0.85)}
    # c is dominated by a (lower loss, higher fidelity); d by b (same fidelity, lower loss); e by a
    assert pareto_front(pts) == ["a", "b"]
    assert pareto_front({"x": (1.0, 0.5)}) == ["x"]
    assert pareto_front({"x": (1.0, 0.5), "y": (1.0, 0.5)}) == ["x", "y"]  # ties dominate nothing


def _cell(gate: str, losses: list[float], fids: list[float]) -> dict:
    from sqs.stats import mean_std

    return {"lm": False, "gate": gate.split("-")[0], "label": gate, "best": "affine",
            "loss_by_seed": dict(enumerate(losses)), "loss": mean_std(losses),
            "fidelity_by_seed": dict(enumerate(fids)), "best_fidelity": mean_std(fids)}


def test_the_verdict_says_when_sqs_beats_both_bilinear_on_loss_and_swiglu_on_fidelity():
    cells = {"bilinear": _cell("bilinear", [0.50, 0.52, 0.51], [1.0, 1.0, 1.0]),
             "swiglu": _cell("swiglu", [0.40, 0.41, 0.42], [0.80, 0.82, 0.81]),
             "sqs": _cell("sqs", [0.45, 0.46, 0.47], [0.90, 0.91, 0.92]),          # beats both, every seed
             "sqs-lam0.05": _cell("sqs-lam0.05", [0.49, 0.53, 0.50], [0.99, 0.99, 0.99])}  # loss: by the mean only
    v = panel_verdict(cells)
    assert v["beats_both"] == ["sqs", "sqs-lam0.05"]
    assert v["beats_both_every_seed"] == ["sqs"]
    assert v["front"] == ["swiglu", "sqs", "sqs-lam0.05", "bilinear"]
    assert v["sqs_on_front"] == ["sqs", "sqs-lam0.05"]
    assert v["separated"]  # means span 0.10, seed std at most 0.02
    c = v["comparisons"]["sqs"]
    assert c["loss_minus_bilinear"]["mean"] == pytest.approx(-0.05)
    assert c["fidelity_minus_swiglu"]["mean"] == pytest.approx(0.10)


def test_the_verdict_says_plainly_when_nothing_is_beaten_and_the_gates_do_not_separate():
    cells = {"bilinear": _cell("bilinear", [0.50, 0.40, 0.45], [1.0, 1.0, 1.0]),
             "swiglu": _cell("swiglu", [0.44, 0.48, 0.46], [0.95, 0.96, 0.97]),
             "sqs": _cell("sqs", [0.47, 0.45, 0.46], [0.90, 0.91, 0.92])}
    v = panel_verdict(cells)
    assert v["beats_both"] == [] and v["beats_both_every_seed"] == []
    assert not v["separated"]  # means within 0.01, seed std 0.05


def _image_analysis(seed: int, fids: dict[str, float], loss: float = 0.3) -> dict:
    return {"kind": "image", "layers": 1, "test_loss": loss, "test_acc": 0.9, "saturation": [None], "seed": seed,
            "fidelity": {r: {"logit_r2": f, "logit_r2_scaled": f, "surrogate_acc": 0.9, "agreement": 0.9,
                             "layers_r2": [f]} for r, f in fids.items()}}


def test_a_cell_never_picks_a_reading_that_only_some_seeds_have():
    from sqs.experiments.frontier import Setting
    from sqs.experiments.gates import GateRun

    spec = [GateRun(f"x/{s}", Path(f"r{s}"), None, task="mnist", depth="sec41", setting=Setting("swiglu"), seed=s)
            for s in range(3)]
    res = [(spec[0], _image_analysis(0, {"gain": 0.8, "affine": 0.9, "fit": 0.99})),
           (spec[1], _image_analysis(1, {"gain": 0.7, "affine": 0.92})),
           (spec[2], _image_analysis(2, {"gain": 0.75, "affine": 0.91}))]
    cell = aggregate(res)[("mnist", "sec41")]["swiglu"]
    assert cell["best"] == "affine"
    assert cell["best_fidelity"]["mean"] == pytest.approx(0.91)
    assert set(cell["fidelity"]) == {"gain", "affine"} and cell["fidelity_some_seeds"]["fit"]["n"] == 1


# ----------------------------------------------------------------------------- the command, tiny


TINY_GRID = """
[grid]
datasets = ["mnist"]
depths = ["sec41", "depth2-rmsnorm"]
gates = ["swiglu", "bilinear", "sqs"]
sqs_lam = [0.5, 0.05]
seeds = [0, 1]

[grid.lm]
config = "{lm}"
seeds = [0, 1]

[analysis]
readings = ["first-order", "gain", "affine"]
fit_reading_depths = ["sec41"]
fit_seeds = [0]
fit_rows = 200
probe_images = 32
lm_windows = 6
lm_fit_windows = 6
lm_tokens = ["."]
"""
TINY_IMAGE = ["batch_size=32", "model.d_model=8", "model.d_hidden=8", "early_eval_every=0", "eval_points=2",
              "noise_std=0.3", "noise_relative=false", "eval_batch_size=64", "epochs=2"]


def test_the_benchmark_runs_reads_every_run_and_resumes_from_its_caches(tmp_path, tinystories_cache, monkeypatch,
                                                                         capsys):
    from sqs.training.rundir import GATES_ANALYSIS, unregistered_files

    cache = tmp_path / "cache"  # the session's TinyStories import beside this test's own image dataset
    cache.mkdir()
    (cache / "tinystories").symlink_to(Path(tinystories_cache) / "tinystories", target_is_directory=True)
    fill_image_cache(cache)
    (tmp_path / "tiny.toml").write_text(TINY_LM_TOML)
    grid = tmp_path / "grid.toml"
    grid.write_text(TINY_GRID.replace("{lm}", str(tmp_path / "tiny.toml")))
    runs, out = tmp_path / "runs", tmp_path / "out"
    argv = ["experiment", "gates", "--grid", str(grid), "--runs-dir", str(runs), "--out", str(out), "--workers", "1",
            "--cache-dir", str(cache), "--no-progress"] + sum((["--set", s] for s in TINY_IMAGE), [])
    assert main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_runs"] == 2 * 4 * 2 + 4 * 2 and summary["missing"] == []
    assert (out / "pareto.png").stat().st_size > 10_000
    table = (out / "table.md").read_text()
    assert "## Verdict" in table and "Pareto front" in table and "TinyStories" in table
    panels = summary["panels"]
    assert set(panels) == {"mnist/sec41", "mnist/depth2-rmsnorm", "tinystories/tiny"}
    for key, cells in panels.items():
        assert set(cells) == {"swiglu", "bilinear", "sqs", "sqs-lam0.05"}
        bil = cells["bilinear"]
        assert bil["best"] == "first-order"  # exact: the simplest reading wins the tie
        assert bil["best_fidelity"]["mean"] > 1 - 1e-9, (key, bil["best_fidelity"])  # Bilinear is read exactly
        assert cells["swiglu"]["best"] in ("gain", "affine")
        assert cells["sqs"]["vs_bilinear_match5"]["n"] == 2  # compared with the same-seed Bilinear
    assert panels["mnist/sec41"]["sqs"]["fidelity_some_seeds"]["fit"]["n"] == 1  # the fit, seed 0 only
    for cfg in runs.glob("**/config.json"):
        assert (cfg.parent / GATES_ANALYSIS).is_file() and not unregistered_files(cfg.parent)

    stamps = {p: p.stat().st_mtime_ns for p in runs.glob(f"**/{GATES_ANALYSIS}")}
    capsys.readouterr()
    assert main(argv) == 0  # nothing to train, every analysis current
    err = capsys.readouterr().err
    assert "trained 0" in err
    assert {p: p.stat().st_mtime_ns for p in runs.glob(f"**/{GATES_ANALYSIS}")} == stamps
    assert json.loads((out / "summary.json").read_text())["verdict"] == summary["verdict"]


def test_the_benchmark_takes_the_grid_launch_flags_and_forwards_them_to_every_run(tmp_path, tinystories_cache,
                                                                                 monkeypatch, capsys):
    """`--launcher ray --cpus-per-run --gpus-per-run --ray-address --logger` reach the pool for the image
    runs and the LM runs alike (Ray itself is replaced by the inline launcher here: tests/test_ray_launcher.py
    runs a grid on a real local Ray)."""
    pytest.importorskip("tensorboardX")
    from sqs.runs import pool, ray_launcher
    from sqs.training.rundir import TENSORBOARD, is_complete

    seen = []

    def fake_ray(todo, run_one, workers, threads, run_bars, finished, **options):
        seen.append(([s.name for s in todo], threads, options))
        pool.inline(todo, run_one, workers, threads, run_bars, finished)

    monkeypatch.setattr(ray_launcher, "require_ray", lambda: None)
    monkeypatch.setitem(pool.LAUNCHERS, "ray", fake_ray)
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "tinystories").symlink_to(Path(tinystories_cache) / "tinystories", target_is_directory=True)
    fill_image_cache(cache)
    (tmp_path / "tiny.toml").write_text(TINY_LM_TOML)
    grid = tmp_path / "grid.toml"
    grid.write_text(f'[grid]\ndatasets = ["mnist"]\ndepths = ["sec41"]\ngates = ["bilinear"]\nseeds = [0]\n'
                    f'[grid.lm]\nconfig = "{tmp_path / "tiny.toml"}"\nseeds = [0]\n')
    runs = tmp_path / "runs"
    argv = ["experiment", "gates", "--grid", str(grid), "--runs-dir", str(runs), "--train-only", "--no-progress",
            "--cache-dir", str(cache), "--launcher", "ray", "--cpus-per-run", "2", "--gpus-per-run", "0",
            "--ray-address", "head:6379", "--logger", "tensorboard"] + sum((["--set", s] for s in TINY_IMAGE), [])
    assert main(argv) == 0
    assert "Ray tasks of 2 CPU(s), 0 GPU(s), 2 thread(s) each, on head:6379" in capsys.readouterr().err
    options = {"address": "head:6379", "cpus_per_run": 2.0, "gpus_per_run": 0.0}
    assert seen == [(["sec41/mnist/bilinear-s0"], 2, options), (["tiny/tinystories/bilinear-s0"], 2, options)]
    done = [cfg.parent for cfg in runs.glob("**/config.json")]
    assert len(done) == 2 and all(is_complete(d) and (d / TENSORBOARD).is_dir() for d in done)
