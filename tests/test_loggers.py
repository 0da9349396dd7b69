"""Training curves to TensorBoard and W&B (sqs.training.loggers), read back from what they wrote.

A run is stopped after a step that is not a checkpoint step, so its resume replays steps the
first session had already logged: the loggers must still show every step once, with the
values of an uninterrupted run, and metrics.jsonl stays the record they mirror.
"""

from __future__ import annotations

import glob
import json
import struct
import sys
from pathlib import Path

import pytest
import torch

from sqs.io import UserError
from sqs.runs.image_config import load_config
from sqs.runs.image_pipeline import build_model, load_data, run_image
from sqs.training.loggers import LoggerUnavailable, check_loggers, parse_loggers, saturation_probe
from sqs.training.rundir import read_metrics, unregistered_files

sys.path.insert(0, str(Path(__file__).parent))
from conftest import write_image_dataset  # noqa: E402

TINY = ["batch_size=32", "model.d_model=16", "model.d_hidden=16", "early_eval_every=0", "eval_points=6",
        "noise_std=0.3", "noise_relative=false", "train.lr=1e-2"]
#: 256 images / batch 32 = 8 steps per epoch; 3 epochs = 24 steps, evaluated (and checkpointed) every 4.
STEPS, STOP = 24, 10  # a stop at 10 replays steps 9 and 10 from the step-8 checkpoint


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return load_data("mnist", data_dir=write_image_dataset(tmp_path_factory.mktemp("idx")))


def _cfg(gate: str = "sqs"):
    return load_config("sec42", TINY + [f'model.gate="{gate}"', "epochs=3"])


def _interrupted_and_resumed(run: Path, data, loggers) -> list[dict]:
    run_image(_cfg(), run, progress=False, data=data, stop_after=STOP, loggers=loggers)
    return run_image(_cfg(), run, progress=False, data=data, loggers=loggers)


def _eval_steps(run: Path) -> list[int]:
    return [r["step"] for r in read_metrics(run)]


# ----------------------------------------------------------------------------- TensorBoard


def _scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    """What TensorBoard shows: every scalar tag's (step, value), through TensorBoard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _raw_steps(logdir: Path, tag: str) -> list[int]:
    """The steps of `tag` in the event files as written (before any reader drops purged ones)."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    steps = []
    for path in sorted(logdir.iterdir()):
        for event in EventFileLoader(str(path)).Load():
            steps += [event.step for v in event.summary.value if v.tag == tag]
    return steps


def test_tensorboard_shows_every_step_once_after_a_resume_with_the_uninterrupted_values(tmp_path, data,
                                                                                     eager_backend):
    pytest.importorskip("tensorboardX")
    pytest.importorskip("tensorboard")
    ref, run = tmp_path / "ref", tmp_path / "run"
    run_image(_cfg(), ref, progress=False, data=data, loggers=("tensorboard",))
    _interrupted_and_resumed(run, data, ("tensorboard",))

    seen, want = _scalars(run / "tensorboard"), _scalars(ref / "tensorboard")
    assert sorted(_raw_steps(run / "tensorboard", "train/loss")).count(STOP) == 2  # the replay was logged again
    for tag in ("train/loss", "train/lr", "train/grad_norm"):
        assert [s for s, _ in seen[tag]] == list(range(1, STEPS + 1)), tag  # ... and is shown once
    for tag in ("eval/test_loss", "eval/test_acc", "saturation/layers.0", "saturation/layers.1"):
        assert [s for s, _ in seen[tag]] == _eval_steps(run), tag
    assert {"train/examples_per_s", "train/loss_mean"} <= set(seen)
    for tag in set(want) - {"train/examples_per_s", "time/elapsed_s"}:  # timings differ, the rest is exact
        assert seen[tag] == want[tag], tag
    # the same numbers as metrics.jsonl (stored as float32 in the event files)
    records = {r["step"]: r for r in read_metrics(run)}
    for step, value in seen["eval/test_acc"]:
        assert value == pytest.approx(records[step]["test_acc"], rel=1e-6)
    for step, value in seen["saturation/layers.1"]:
        assert value == pytest.approx(records[step]["saturation"]["layers.1"], rel=1e-6)
    assert records[STEPS]["grad_norm"] == pytest.approx(dict(seen["train/grad_norm"])[STEPS], rel=1e-6)
    assert len(list((run / "tensorboard").iterdir())) == 2 and not unregistered_files(run)


def test_the_config_goes_to_tensorboard_as_hyperparameters(tmp_path, data, eager_backend):
    pytest.importorskip("tensorboardX")
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.plugins.hparams import plugin_data_pb2

    run_image(_cfg(), tmp_path / "run", progress=False, data=data, loggers=("tensorboard",))
    (events,) = (tmp_path / "run" / "tensorboard").iterdir()
    hparams = {}
    for event in EventFileLoader(str(events)).Load():
        for v in event.summary.value:
            if v.metadata.plugin_data.plugin_name == "hparams":
                data_ = plugin_data_pb2.HParamsPluginData.FromString(v.metadata.plugin_data.content)
                if data_.HasField("session_start_info"):
                    hparams = {k: (x.string_value or x.number_value or x.bool_value)
                               for k, x in data_.session_start_info.hparams.items()}
    assert hparams["model.gate"] == "sqs" and hparams["batch_size"] == 32 and hparams["dataset"] == "mnist"


# ----------------------------------------------------------------------------- W&B


def _wandb_records(path: Path):
    """The protobuf records of a W&B transaction log (`run-<id>.wandb`): a 7-byte header, then
    LevelDB-log blocks of 32 KiB holding records split in chunks (crc, length, type)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, chunk = path.read_bytes(), 7, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:  # block trailer
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:
            pos += left
            continue
        chunk += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            rec = pb.Record()
            rec.ParseFromString(chunk)
            chunk = b""
            yield rec


@pytest.fixture
def wandb_offline(tmp_path, monkeypatch):
    """W&B offline, with its config, cache and data folders in tmp (no account, nothing in $HOME)."""
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home" / var.lower()))
    monkeypatch.delenv("WANDB_DIR", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)


def test_a_resumed_run_continues_its_wandb_run_without_a_duplicate_step(tmp_path, data, eager_backend,
                                                                         wandb_offline):
    run = tmp_path / "run"
    _interrupted_and_resumed(run, data, ("jsonl", "wandb"))
    state = json.loads((run / "wandb.json").read_text())
    sessions = sorted(glob.glob(str(run / "wandb" / f"offline-run-*-{state['id']}")))
    assert len(sessions) == 2 and state["last_step"] == STEPS  # two sessions of one W&B run, in the run dir

    history: dict[str, list[tuple[int, float]]] = {}
    config = {}
    for session in sessions:
        for rec in _wandb_records(Path(session) / f"run-{state['id']}.wandb"):
            if rec.WhichOneof("record_type") == "history":
                for item in rec.history.item:
                    key = item.key or "/".join(item.nested_key)
                    if not key.startswith("_"):
                        history.setdefault(key, []).append((rec.history.step.num, json.loads(item.value_json)))
            elif rec.WhichOneof("record_type") == "run":
                config.update({u.key or "/".join(u.nested_key): json.loads(u.value_json)
                               for u in rec.run.config.update})
    assert [s for s, _ in history["train/loss"]] == list(range(1, STEPS + 1))
    assert [s for s, _ in history["train/grad_norm"]] == list(range(1, STEPS + 1))
    records = {r["step"]: r for r in read_metrics(run)}
    assert [s for s, _ in history["eval/test_acc"]] == sorted(records)
    assert all(v == records[s]["test_acc"] for s, v in history["eval/test_acc"])  # exact: JSON, not float32
    assert all(v == records[s]["saturation"]["layers.0"] for s, v in history["saturation/layers.0"])
    assert config["model"]["gate"] == "sqs" and config["resolved"]["steps_per_epoch"] == 8
    assert not unregistered_files(run)


# ----------------------------------------------------------------------------- what is measured, errors


def test_the_saturation_share_is_the_frontier_analysis_number(data, eager_backend):
    from sqs.experiments.frontier_analysis import saturation_share

    model = build_model(load_config("sec42", TINY + ["model.gate_kwargs.lam=20"])).eval()  # 1/lam within reach
    x_test = data[2]
    with torch.no_grad(), saturation_probe(model) as shares:
        model(x_test)
    assert list(shares.values()) == pytest.approx(saturation_share(model, x_test))
    assert set(shares) == {"layers.0", "layers.1"} and 0 < shares["layers.0"] < 1
    with saturation_probe(build_model(_cfg("swiglu"))) as none:  # no SQS layer, nothing measured
        pass
    assert none == {}


def test_logger_names_and_a_missing_package_are_one_line_naming_the_extra(monkeypatch, capsys, tmp_path):
    from sqs.cli import main

    assert parse_loggers("tensorboard, wandb") == ("jsonl", "tensorboard", "wandb")
    with pytest.raises(UserError, match="unknown logger 'tensorbored'; choose from jsonl, tensorboard, wandb"):
        parse_loggers("jsonl,tensorbored")
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    with pytest.raises(LoggerUnavailable, match=r"pip install 'sqs\[wandb\]'"):
        check_loggers(["jsonl", "wandb"])
    assert main(["train", "image", "--logger", "wandb", "--run-dir", str(tmp_path / "r"), "--epochs", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install 'sqs[wandb]'" in err and not (tmp_path / "r").exists()
    assert main(["train", "image", "--logger", "jsonl,tensorbored"]) == 2
    assert "unknown logger 'tensorbored'" in capsys.readouterr().err


def test_the_tinystories_grid_through_a_launcher_logs_tokens_per_s_and_saturation(tinystories_cache, tmp_path,
                                                                                  eager_backend, no_figures):
    """The TinyStories experiment's launcher path (the one `--launcher ray` takes), here with the
    pool's inline launcher, and what an LM run logs: tokens/s, validation metrics, GLU saturation."""
    pytest.importorskip("tensorboardX")
    pytest.importorskip("tensorboard")
    from conftest import TINY_LM_TOML
    from sqs.experiments.lm_table import run_experiment

    cfg = tmp_path / "tiny.toml"
    cfg.write_text(TINY_LM_TOML)
    table = run_experiment(cfg, out=tmp_path / "out", runs_dir=tmp_path / "runs", gates=["sqs"], extra_seeds=[],
                           cache_dir=tinystories_cache, progress=False, samples=False, throughput_reps=0,
                           launcher="inline", loggers=("tensorboard",))
    assert [(r["gate"], r["complete"]) for r in table["runs"]] == [("sqs", True)]
    run = tmp_path / "runs" / "tiny" / "tinystories" / "sqs-s0"
    seen = _scalars(run / "tensorboard")
    assert [s for s, _ in seen["train/loss"]] == [1, 2, 3, 4]
    assert {"train/tokens_per_s", "eval/val_loss", "eval/val_ppl", "eval/val_bpb",
            "saturation/blocks.0.mlp"} <= set(seen)
    last = read_metrics(run)[-1]
    assert last["saturation"]["blocks.0.mlp"] == pytest.approx(dict(seen["saturation/blocks.0.mlp"])[4], rel=1e-6)
    assert not unregistered_files(run)
