"""One run-name source and one spelling for gate parameters, through every command that makes a run.

A run with a non-default gate parameter is filed under a tagged directory (`sqs-lam0.1-s0`) by
every command, because each asks its run config for the directory (`cfg.run_dir(root)`); a bad
gate parameter is one line and exit status 2 before anything is written, `--print-config`
included; the LM's old spelling `gate_kwargs={...}` is refused with the new one.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sqs.cli import main

from conftest import TINY_LM_TOML, write_image_dataset

TINY_IMAGE = ["batch_size=32", "model.d_model=8", "model.d_hidden=8", "early_eval_every=0", "eval_points=2",
              "noise_std=0.3", "noise_relative=false", "eval_batch_size=64"]
TINY_GRID = """
[grid]
datasets = ["mnist"]
references = []
[grid.sqs]
lam = [0.1]
[grid.one_layer]
config = "sec41"
seeds = [0]
[grid.two_layer]
config = "sec42"
seeds = []
"""
LAM = ["--set", "model.gate_kwargs.lam=0.1"]

pytestmark = pytest.mark.usefixtures("eager_backend")


def _sets(overrides: list[str]) -> list[str]:
    return sum((["--set", s] for s in overrides), [])


@pytest.fixture(scope="module")
def image_cache(tmp_path_factory) -> Path:
    cache = tmp_path_factory.mktemp("cache")
    write_image_dataset(cache / "images" / "mnist")
    return cache


@pytest.fixture
def lm_config(tmp_path) -> Path:
    path = tmp_path / "tiny.toml"
    path.write_text(TINY_LM_TOML)
    return path


def _runs(root: Path) -> set[str]:
    """Every run directory under `root`, relative to it."""
    return {p.parent.relative_to(root).as_posix() for p in root.glob("**/config.json")}


def _made(root: Path, before: set[str], *names: str) -> set[str]:
    """The command just run left exactly the finished runs `names` besides the `before` ones (runs of
    identical configs are shared between commands: a command that named them otherwise would add a
    directory here)."""
    now = _runs(root)
    assert now == before | set(names), f"expected {sorted(before | set(names))}, found {sorted(now)}"
    assert all((root / n / "model.safetensors").is_file() for n in names), "a run did not finish"
    return now


def _only_registered_files(runs: Path) -> None:
    """Every file the commands left in a run directory is one `sqs.training.rundir` registers."""
    from sqs.training.rundir import RUN_FILES, unregistered_files

    for run in runs.glob("**/config.json"):
        assert not unregistered_files(run.parent), (run.parent, unregistered_files(run.parent), sorted(RUN_FILES))


def _brief(pairs: list, k: int = 10) -> dict:
    """A stand-in for `agreement_brief` of the right shape (the agreement itself is tested elsewhere and
    takes most of an experiment's time)."""
    side = {"per_rank": [0.5] * k, "best_match": [0.5] * k, "overlap": 0.5}
    return {"n_pairs": len(pairs), "k": k, "form_cosine": 0.5, "form_cosine_centered": 0.5,
            "positive": side, "negative": side, "abs": side}


def test_every_image_command_files_a_non_default_lambda_under_its_tag(tmp_path, image_cache, monkeypatch, no_figures):
    from sqs.experiments import demo, weight_spectra

    for module in (demo, weight_spectra):
        monkeypatch.setattr(module, "agreement_brief", _brief)
    monkeypatch.chdir(tmp_path)  # a command that filed runs elsewhere would leave them under ./runs
    r, data = tmp_path / "r", image_cache / "images" / "mnist"
    tiny = _sets(TINY_IMAGE)
    assert main(["train", "image", "--config", "sec42", "--gate", "sqs", "--epochs", "1", "--data-dir", str(data),
                 "--runs-dir", str(r), "--no-progress", *tiny, *LAM]) == 0
    runs = _made(r, set(), "sec42/mnist/sqs-lam0.1-s0")
    assert main(["experiment", "table1", "--gates", "relu", "sqs", "--seeds", "1", "--datasets", "mnist",
                 "--epochs", "1", "--workers", "1", "--runs-dir", str(r), "--cache-dir", str(image_cache),
                 "--out", str(tmp_path / "t1-out"), "--no-progress", *tiny, *LAM]) == 0
    runs = _made(r, runs, "sec42/mnist/relu-s0")  # relu takes no parameters; the SQS run is train image's
    assert "SQS (lam0.1)" in (tmp_path / "t1-out" / "table1.md").read_text()
    one_layer = [*tiny, "--set", "batch_size=64"]
    assert main(["experiment", "spectra", "--seeds", "1", "--epochs", "1", "--datasets", "mnist", "--data-dir",
                 str(data), "--runs-dir", str(r), "--out", str(tmp_path / "sp-out"), *one_layer, *LAM]) == 0
    runs = _made(r, runs, *(f"sec41/mnist/{g}-{s}" for g in ("bilinear", "sqs-lam0.1") for s in ("s0", "i0-d1", "i1-d2")))
    assert main(["demo", "--epochs", "1", "--data-dir", str(data), "--runs-dir", str(r),
                 "--out", str(tmp_path / "demo-out"), *one_layer, *LAM]) == 0
    runs = _made(r, runs)  # the spectra experiment's bilinear-s0 and sqs-lam0.1-s0
    assert "λ = 0.1" in (tmp_path / "demo-out" / "report.md").read_text()
    grid = tmp_path / "grid.toml"
    grid.write_text(TINY_GRID)
    assert main(["experiment", "frontier", "--grid", str(grid), "--epochs", "1", "--workers", "1", "--train-only",
                 "--runs-dir", str(r), "--cache-dir", str(image_cache), "--no-progress", *one_layer]) == 0
    _made(r, runs, "sec41/mnist/sqs-s0")  # the grid's default setting; its λ = 0.1 run is the spectra one
    assert not Path("runs").exists()
    _only_registered_files(r)


def test_every_lm_command_files_a_non_default_lambda_under_its_tag(tmp_path, lm_config, tinystories_cache,
                                                                   monkeypatch, no_figures):
    monkeypatch.chdir(tmp_path)
    r, cache = tmp_path / "r", str(tinystories_cache)
    common = ["--config", str(lm_config), "--cache-dir", cache, "--device", "cpu", "--no-progress", "--runs-dir", str(r)]
    assert main(["train", "lm", "--gate", "sqs", *common, *LAM]) == 0
    runs = _made(r, set(), "tiny/tinystories/sqs-lam0.1-s0")
    assert main(["experiment", "tinystories", "--gates", "sqs", "bilinear", "--extra-seeds", "--throughput-reps",
                 "0", "--no-samples", "--out", str(tmp_path / "ts-out"), *common, *LAM]) == 0
    runs = _made(r, runs, "tiny/tinystories/bilinear-s0")
    assert main(["experiment", "lm-spectra", "--out", str(tmp_path / "ls-out"), "--windows", "4", "--k", "2",
                 "--directions", ".", *common, *LAM]) == 0
    _made(r, runs, "tiny/tinystories/sqs-lam0.1-s1")
    assert not Path("runs").exists()
    _only_registered_files(r)


@pytest.mark.parametrize("bad, names", [("lam=-1", ["lam", ">= 0"]), ("lamda=0.1", ["lamda", "c, lam, p"]),
                                        ("p=0", ["p", "> 0"]), ('lam="0.1"', ["lam", "a number"])])
def test_a_bad_gate_parameter_is_one_line_before_anything_is_written(bad, names, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    runs = tmp_path / "runs"
    setting = ["--set", f"model.gate_kwargs.{bad}"]
    commands = [["train", "image", "--gate", "sqs", "--runs-dir", str(runs)],
                ["train", "image", "--gate", "sqs", "--print-config"],
                ["train", "lm", "--gate", "sqs", "--runs-dir", str(runs)],
                ["train", "lm", "--gate", "sqs", "--print-config"],
                ["experiment", "table1", "--runs-dir", str(runs), "--out", str(tmp_path / "out")]]
    for cmd in commands:
        assert main(cmd + setting) == 2, cmd
        captured = capsys.readouterr()
        err = captured.err.strip()
        assert len(err.splitlines()) == 1 and "Traceback" not in err, (cmd, err)
        assert "model.gate_kwargs" in err and all(n in err for n in names), (cmd, err)
        assert captured.out == "", cmd  # --print-config printed nothing
    assert list(tmp_path.iterdir()) == []  # nothing written: no run directory, no report


def test_the_old_lm_spelling_is_refused_with_the_new_one(capsys):
    assert main(["train", "lm", "--print-config", "--set", "gate_kwargs={lam=0.1}"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "--set model.gate_kwargs.lam=0.1" in err
    assert main(["train", "lm", "--print-config", "--gate", "sqs", "--set", "model.gate_kwargs.lam=0.1"]) == 0
    assert "gate_kwargs = {lam = 0.1}" in capsys.readouterr().out


def test_one_spelling_reaches_the_same_run_as_before(tmp_path):
    """The LM run config and its config.json keep their flat `gate_kwargs`: runs made with the old
    spelling are the same runs (same directory, same stored config)."""
    from sqs.runs.image_config import load_config as load_image_config
    from sqs.runs.lm_config import load_config as load_lm_config

    lm = load_lm_config("tinystories-1epoch", ["model.gate_kwargs.lam=0.05"], gate="sqs", seed=1)
    assert lm.to_dict()["gate_kwargs"] == {"lam": 0.05}
    assert lm.run_dir("runs").as_posix() == "runs/tinystories-1epoch/tinystories/sqs-lam0.05-s1"
    image = load_image_config("sec42", ['dataset="fashion-mnist"', "model.gate=sqs", "model.gate_kwargs.lam=0.05"])
    assert image.run_dir("runs").as_posix() == "runs/sec42/fashion-mnist/sqs-lam0.05-s0"
    assert json.loads(json.dumps(image.to_dict()))["model"]["gate_kwargs"] == {"lam": 0.05}
    assert "config" not in image.to_dict()  # the config's name files the run; it is not part of config.json
    default = load_image_config("sec42", ["model.gate=sqs", "model.gate_kwargs.lam=0.5"])  # the default value
    assert default.run_dir("runs").as_posix() == "runs/sec42/mnist/sqs-s0"
