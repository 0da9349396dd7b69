"""Image experiments end to end on tiny synthetic IDX data (no downloads, a few seconds)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sqs.experiments.table1 import grid_dir, plan_grid, run_table1
from sqs.experiments.table1_report import first_crossing, write_report
from sqs.runs.config_files import config_names, loads_toml, parse_override
from sqs.runs.image_config import ImageRunConfig, load_config
from sqs.runs.image_pipeline import ImageTask, load_data, load_image_model, run_image, run_record
from sqs.training.checkpoint import CheckpointError
from sqs.training.rundir import is_complete, read_metrics

from conftest import IMG_TRAIN as N_TRAIN  # noqa: E402
from conftest import fill_image_cache, write_image_dataset as _write_dataset  # noqa: E402
TINY = ["batch_size=32", "model.d_model=16", "model.d_hidden=16", "early_eval_every=0", "eval_points=6",
        "noise_std=0.3", "noise_relative=false", "train.lr=1e-2"]




@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return _write_dataset(tmp_path_factory.mktemp("idx"))


@pytest.fixture(scope="module")
def data(data_dir):
    return load_data("mnist", data_dir=data_dir)


def _cfg(*extra: str, gate: str = "relu", epochs: int = 3) -> ImageRunConfig:
    return load_config("sec42", TINY + [f"model.gate={json.dumps(gate)}", f"epochs={epochs}", *extra])


def _strip(recs):
    return [{k: v for k, v in r.items() if k not in ("elapsed_s", "examples_per_s")} for r in recs]


# ----------------------------------------------------------------------------- training


def test_short_training_lowers_the_loss_and_model_reloads(tmp_path, data):
    cfg = _cfg()
    recs = run_image(cfg, tmp_path / "run", progress=False, data=data)
    assert recs[0]["step"] == 0 and recs[-1]["final"]
    assert recs[-1]["step"] == 3 * (N_TRAIN // 32)  # floor(N / batch) steps per epoch
    assert recs[-1]["test_loss"] < recs[0]["test_loss"] - 0.3
    assert recs[-1]["test_acc"] > 0.2  # chance is 0.1
    assert {r["fraction"] for r in recs if "fraction" in r} == {0.25, 0.5, 0.75, 1.0}
    assert is_complete(tmp_path / "run")

    model, config = load_image_model(tmp_path / "run")
    assert config["model"]["gate"] == "relu" and not model.training
    x_te, y_te = data[2], data[3]
    with torch.no_grad():
        loss = torch.nn.functional.cross_entropy(model(x_te), y_te).item()
    assert loss == pytest.approx(recs[-1]["test_loss"], rel=1e-5)


def test_sqs_gate_trains(tmp_path, data, eager_backend):  # the eager backend: no compile step in a unit test
    recs = run_image(_cfg(gate="sqs", epochs=2), tmp_path / "run", progress=False, data=data)
    assert recs[-1]["test_loss"] < recs[0]["test_loss"]


def test_resume_after_interrupt_reproduces_uninterrupted_run(tmp_path, data):
    cfg = _cfg()
    full = run_image(cfg, tmp_path / "a", progress=False, data=data)
    part = run_image(cfg, tmp_path / "b", progress=False, data=data, stop_after=11)  # between checkpoints
    assert not is_complete(tmp_path / "b") and part[-1]["step"] < full[-1]["step"]
    resumed = run_image(cfg, tmp_path / "b", progress=False, data=data)
    assert _strip(resumed) == _strip(full)
    assert _strip(read_metrics(tmp_path / "b")) == _strip(full)
    ma, _ = load_image_model(tmp_path / "a")
    mb, _ = load_image_model(tmp_path / "b")
    for (ka, va), (kb, vb) in zip(ma.state_dict().items(), mb.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)


def test_load_image_model_rejects_weights_of_another_config(tmp_path, data):
    run = tmp_path / "run"
    run_image(_cfg(epochs=1), run, progress=False, data=data)
    config = json.loads((run / "config.json").read_text())
    config["model"]["gate"] = "gelu"  # same shapes, other model
    (run / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="another model config"):
        load_image_model(run)
    config["model"]["d_hidden"] = 24
    (run / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError):
        load_image_model(run)
    with pytest.raises(FileNotFoundError, match="not a run directory"):
        load_image_model(tmp_path / "nothing")


def test_task_batches_are_epochs_without_replacement_and_split_consistently():
    n, d, bs = 100, 3, 16
    x = torch.arange(n, dtype=torch.float32)[:, None].repeat(1, d)
    y = torch.arange(n) % 10
    task = ImageTask(x, y, x[:10], y[:10], batch_size=bs, seed=1, noise_std=0.0)
    spe = n // bs
    seen = torch.cat([task.batch(t)[0][:, 0] for t in range(spe)]).long()
    assert seen.unique().numel() == spe * bs  # disjoint batches within the epoch
    nxt = torch.cat([task.batch(t)[0][:, 0] for t in range(spe, 2 * spe)]).long()
    assert not torch.equal(seen, nxt)  # a new permutation each epoch
    noisy = ImageTask(x, y, x[:10], y[:10], batch_size=bs, seed=1, noise_std=1.0, grad_accum=2)
    whole = torch.cat([noisy.batch(5, m)[0] for m in range(2)])
    assert torch.equal(noisy.batch(5, 0)[0], noisy.batch(5, 0)[0])  # deterministic in (step, micro)
    ranks = torch.cat([noisy.batch(5, m, r, 2)[0] for m in range(2) for r in range(2)])
    assert torch.equal(whole, ranks)  # two ranks together see the one-process batch
    assert (whole - whole.round()).abs().max() > 0.1  # noise was added in training
    ev = noisy.evaluate(torch.nn.Sequential(torch.nn.Linear(d, 10)))
    assert set(ev) == {"test_loss", "test_acc"}


# ----------------------------------------------------------------------------- config


def test_shipped_configs_match_the_paper_and_round_trip():
    assert {"sec41", "sec42"} <= set(config_names("image"))
    s41, s42 = load_config("sec41"), load_config("sec42")
    assert (s41.model.n_layers, s41.batch_size, s41.model.d_model) == (1, 2048, 128)
    assert (s42.model.n_layers, s42.batch_size, s42.model.d_model) == (2, 512, 128)
    for c in (s41, s42):
        assert c.epochs == 20 and c.noise_std == 1.0
        assert c.train["lr"] == 1e-3 and c.train["weight_decay"] == 0.1
        tc = c.train_config(60000)
        assert tc.min_lr == 0.0 and tc.warmup_steps == 0
    assert s41.model.is_quadratic and s41.model.norm == "none"
    assert s42.train_config(60000).steps == 20 * 117 and s41.train_config(60000).steps == 20 * 29
    cfg = load_config("sec42", ["model.gate=bilinear", "seed=3", "train.betas=[0.9, 0.95]",
                                   'dataset="fashion-mnist"'])
    assert cfg.model.gate == "bilinear" and cfg.seed == 3 and cfg.dataset == "fashion-mnist"
    text = cfg.to_toml()
    back = ImageRunConfig.from_dict(loads_toml(text))
    assert back == cfg and back.to_toml() == text


def test_config_file_and_errors(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text(_cfg(gate="gelu").to_toml())
    assert load_config(path).model.gate == "gelu"
    with pytest.raises(FileNotFoundError, match="sec42"):
        load_config("no-such-config")
    with pytest.raises(ValueError, match="unknown key"):
        load_config("sec42", ["model.widht=3"])
    with pytest.raises(ValueError, match="`steps` comes from `epochs`"):
        load_config("sec42", ["train.steps=10"])
    with pytest.raises(ValueError, match="dataset"):
        load_config("sec42", ["dataset=cifar"])
    with pytest.raises(ValueError, match="key=value"):
        parse_override("model.norm")


# ----------------------------------------------------------------------------- grid and report


def test_grid_inline_skips_finished_runs_and_writes_the_report(tmp_path):
    cache = tmp_path / "cache"
    fill_image_cache(cache)
    runs, out = tmp_path / "runs", tmp_path / "results"
    specs = plan_grid(runs, datasets=["mnist"], gates=["relu", "bilinear"], seeds=2, epochs=2,
                             overrides=TINY)
    assert [s.run_dir for s in specs][:2] == [runs / "sec42/mnist/relu-s0", runs / "sec42/mnist/bilinear-s0"]
    s1 = run_table1(specs, runs, workers=1, threads=1, cache_dir=cache, progress=False, log_dir=grid_dir(runs))
    assert s1["n_trained"] == 4 and not s1["failed"]
    s2 = run_table1(specs, runs, workers=1, threads=1, cache_dir=cache, progress=False, log_dir=grid_dir(runs))
    assert s2["n_trained"] == 0 and s2["n_skipped"] == 4
    # a run dir made with another config is refused before anything starts
    other = plan_grid(runs, datasets=["mnist"], gates=["relu"], seeds=1, epochs=3, overrides=TINY)
    with pytest.raises(ValueError, match="different config"):
        run_table1(other, runs, workers=1, cache_dir=cache, progress=False)

    paths = write_report(runs, out)
    assert (out / "table1.md").exists() and (out / "table1.json").exists()
    assert (out / "curves_mnist.png").stat().st_size > 1000
    md = (out / "table1.md").read_text()
    for needle in ("## MNIST", "ReLU", "Bilinear", "paper", "0.2703", "First to reach", "Timing", "ours (n=2)"):
        assert needle in md, needle
    doc = json.loads((out / "table1.json").read_text())
    assert len(doc["records"]) == 2 * 2 * 4  # gates x seeds x fractions
    rec = doc["records"][0]
    assert set(rec) >= {"dataset", "gate", "seed", "fraction", "test_loss", "test_acc"}
    assert len(doc["grid_log"]) == 1
    assert set(paths) == {"md", "json", "curves_mnist"}


def test_report_from_fake_runs(tmp_path):
    """The writer needs only config.json, metrics.jsonl and model.safetensors of finished runs."""
    runs = tmp_path / "runs"
    for ds in ("mnist", "fashion-mnist"):
        for gate, speed in (("sqs", 2.0), ("relu", 1.0)):
            for seed in range(2):
                cfg = load_config("sec42", [f'dataset="{ds}"', f"model.gate={gate}", f"seed={seed}"])
                d = cfg.run_dir(runs)
                d.mkdir(parents=True)
                (d / "config.json").write_text(json.dumps(run_record(cfg, 60000, 10000)))
                recs = []
                for step in range(0, 2341, 117):
                    acc = min(0.99, 0.1 + speed * step / 1000) - 0.001 * seed
                    rec = {"step": step, "test_loss": 2.3 * (1 - acc) + 0.01, "test_acc": acc, "elapsed_s": step / 100}
                    f = {585: 0.25, 1170: 0.5, 1755: 0.75, 2340: 1.0}.get(step)
                    if f:
                        rec["fraction"] = f
                    if step == 2340:
                        rec["final"] = True
                    recs.append(rec)
                (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
                (d / "model.safetensors").write_bytes(b"")
    cfg = load_config("sec42", ["model.gate=gelu"])
    unfinished = cfg.run_dir(runs)
    unfinished.mkdir(parents=True)
    (unfinished / "config.json").write_text(json.dumps(run_record(cfg, 60000, 10000)))
    write_report(runs, tmp_path / "out")
    md = (tmp_path / "out" / "table1.md").read_text()
    assert "## Fashion-MNIST" in md and "Unfinished runs" in md
    doc = json.loads((tmp_path / "out" / "table1.json").read_text())
    th = doc["first_to_threshold"]["mnist"]["0.8"]
    assert th["first"] == "sqs"  # the faster fake curve crosses first
    assert th["per_gate"]["relu"]["step"] > th["per_gate"]["sqs"]["step"]
    cell = doc["summary"]["mnist/sqs"]["fractions"]["1.0"]
    assert cell["test_acc"]["n"] == 2 and cell["test_acc"]["std"] > 0
    assert (tmp_path / "out" / "curves_fashion-mnist.png").exists()


def test_first_crossing_interpolates():
    step, at = first_crossing([0, 10, 20], [0.1, 0.7, 0.9], 0.8)
    assert step == 20 and at == pytest.approx(15.0)
    assert first_crossing([0, 10], [0.1, 0.5], 0.8) is None


# ----------------------------------------------------------------------------- CLI


def test_cli_parses_train_image_and_table1_help(capsys, data_dir, tmp_path):
    from sqs.cli import build_parser, main

    parser = build_parser()
    args = parser.parse_args(["train", "image", "--config", "sec42", "--dataset", "mnist", "--gate", "sqs",
                              "--seed", "0", "--run-dir", "DIR", "--epochs", "2", "--data-dir", "D"])
    assert (args.config, args.dataset, args.gate, args.seed, args.run_dir, args.epochs, args.data_dir) == (
        "sec42", "mnist", "sqs", 0, "DIR", 2, "D")
    args = parser.parse_args(["experiment", "table1", "--seeds", "2", "--gates", "sqs", "relu", "--workers", "2"])
    assert (args.seeds, args.gates, args.workers, args.out, args.runs_dir) == (2, ["sqs", "relu"], 2,
                                                                               "results/image", "runs")
    with pytest.raises(SystemExit) as e:
        parser.parse_args(["experiment", "table1", "--help"])
    assert e.value.code == 0
    assert "--report-only" in capsys.readouterr().out

    assert main(["train", "image", "--gate", "gelu", "--set", "model.norm=rms", "--print-config"]) == 0
    printed = loads_toml(capsys.readouterr().out)
    assert printed["model"]["gate"] == "gelu" and printed["model"]["norm"] == "rms"

    run = tmp_path / "cli-run"
    assert main(["train", "image", "--data-dir", str(data_dir), "--run-dir", str(run), "--epochs", "1",
                 "--gate", "relu", "--no-progress", *sum((["--set", s] for s in TINY), [])]) == 0
    assert is_complete(run)
