"""The `sqs` command speaks to people: a user error is ONE line on stderr and exit status 2, with
no traceback unless `--debug`; every numeric flag is range-checked before anything runs; the
hints name flags that exist; a bug keeps its traceback.

LM cases run `sqs train lm` on the shipped TinyStories sample with a tiny model (seconds).
"""

from __future__ import annotations

import fcntl
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import sqs.cli
from sqs.cli import main
from sqs.data import tinystories as ts
from sqs.experiments.table1 import plan_grid
from sqs.runs.image_pipeline import check_existing
from sqs.training.checkpoint import CheckpointCorrupt, CheckpointError, content_hash, load_checkpoint, save_checkpoint
from sqs.training.rundir import RunConfigMismatch, is_complete, prepare_run_dir, read_history
from sqs.training.trainer import TrainConfig, _resume_from, make_optimizer

from conftest import TINY_LM_TOML as TINY_TOML  # noqa: E402


pytestmark = pytest.mark.usefixtures("eager_backend")  # same math as compiled, no Inductor start-up


@pytest.fixture(scope="module")
def cache(tinystories_cache):
    return tinystories_cache


@pytest.fixture(scope="module")
def tiny_toml(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("cfg") / "tiny.toml"
    p.write_text(TINY_TOML)
    return p


def train_lm(run_dir, toml, cache, *extra) -> list[str]:
    return ["train", "lm", "--config", str(toml), "--cache-dir", str(cache), "--run-dir", str(run_dir),
            "--device", "cpu", "--no-progress", *extra]


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory, cache, tiny_toml) -> Path:
    with sqs.ops.backend("eager"):
        rd = tmp_path_factory.mktemp("lm") / "run"
        assert main(train_lm(rd, tiny_toml, cache)) == 0
    return rd


def one_line_error(capsys, *names: str) -> str:
    """The captured stderr is one line (no traceback) that names each of `names`."""
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1, err
    for n in names:
        assert n in err, (n, err)
    return err


# ----------------------------------------------------------------------------- flags out of range

BAD_FLAGS = [
    (["train", "lm", "--epochs", "0"], "--epochs"),
    (["train", "lm", "--epochs", "-1"], "--epochs"),
    (["train", "lm", "--tokens", "0"], "--tokens"),
    (["train", "lm", "--steps", "0"], "--steps"),
    (["train", "lm", "--seed", "-1"], "--seed"),
    (["train", "lm", "--allow-change", "gate"], "--allow-change"),
    (["train", "image", "--epochs", "0"], "--epochs"),
    (["train", "image", "--epochs", "inf"], "--epochs"),
    (["generate", "RUN", "--top-k", "-3"], "--top-k"),
    (["generate", "RUN", "--max-new-tokens", "-5"], "--max-new-tokens"),
    (["generate", "RUN", "--num-samples", "0"], "--num-samples"),
    (["generate", "RUN", "--temperature", "nan"], "--temperature"),
    (["generate", "RUN", "--temperature", "-1"], "--temperature"),
    (["bench", "ops", "--reps", "0"], "--reps"),
    (["bench", "glu", "--width", "0"], "--width"),
    (["experiment", "table1", "--seeds", "0"], "--seeds"),
    (["experiment", "tinystories", "--max-new-tokens", "0"], "--max-new-tokens"),
    (["data", "fetch", "tinystories", "--vocab-size", "-1"], "--vocab-size"),
    (["experiment", "table1", "--threads", "0"], "--threads"),
    (["experiment", "table1", "--workers", "-1"], "--workers"),
    (["experiment", "table1", "--epochs", "-2"], "--epochs"),
    (["experiment", "frontier", "--epochs", "-1"], "--epochs"),
    (["experiment", "frontier", "--workers", "0"], "--workers"),
    (["experiment", "spectra", "--epochs", "-1"], "--epochs"),
    (["experiment", "tinystories", "--epochs", "-1"], "--epochs"),
    (["experiment", "lm-spectra", "--steps", "0"], "--steps"),
    (["train", "image", "--threads", "0"], "--threads"),
    (["train", "image", "--run-dir", ""], "--run-dir"),
    (["train", "lm", "--runs-dir", " "], "--runs-dir"),
    (["spectra", "decompose", ""], "run_dir"),
]

# Config keys are checked when the config is built, named as the user wrote them (`--print-config` runs nothing).
BAD_KEYS = [
    (["train", "image", "--set", "train.lr=0"], "train.lr"),
    (["train", "image", "--set", "train.betas=[1, 2]"], "train.betas"),
    (["train", "image", "--set", "train.warmup_steps=-1"], "train.warmup_steps"),
    (["train", "image", "--set", "model.d_model=0"], "model.d_model"),
    (["train", "image", "--set", "model.d_hidden=-3"], "model.d_hidden"),
    (["train", "lm", "--set", "train.betas=[0.9, 1.5]"], "betas"),
    (["train", "lm", "--set", "train.checkpoint_every=-1"], "checkpoint_every"),
    (["train", "lm", "--set", "eval.eval_every=-1"], "eval_every"),
]


@pytest.mark.parametrize("argv,key", BAD_KEYS, ids=[" ".join(a) for a, _ in BAD_KEYS])
def test_a_config_key_out_of_range_is_one_line_naming_it(argv, key, capsys):
    assert main([*argv, "--print-config"]) == 2
    one_line_error(capsys, key)


@pytest.mark.parametrize("argv,flag", BAD_FLAGS, ids=[" ".join(a) for a, _ in BAD_FLAGS])
def test_a_flag_out_of_range_is_one_line_and_status_2(argv, flag, capsys):
    assert main(argv) == 2
    one_line_error(capsys, flag)


def test_a_refused_flag_runs_nothing(tmp_path, capsys):
    assert main(["train", "lm", "--epochs", "0", "--run-dir", str(tmp_path / "run")]) == 2
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- user errors at run time


def test_generate_from_a_missing_run_dir_is_one_line(tmp_path, capsys):
    assert main(["generate", str(tmp_path / "nope")]) == 2
    one_line_error(capsys, str(tmp_path / "nope"), "--run-dir")


def test_debug_shows_the_traceback(tmp_path, capsys):
    assert main(["--debug", "generate", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "NotARunDir" in err and err.strip().splitlines()[-1].startswith("sqs: error:")


def test_sqs_debug_env_shows_the_traceback(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SQS_DEBUG", "1")
    assert main(["generate", str(tmp_path / "nope")]) == 2
    assert "Traceback" in capsys.readouterr().err


def test_a_bug_keeps_its_traceback(monkeypatch, tmp_path):
    from sqs.runs import lm_pipeline

    def broken(*a, **k):
        raise KeyError("a bug")

    monkeypatch.setattr(lm_pipeline, "load_lm", broken)
    with pytest.raises(KeyError):
        main(["generate", str(tmp_path)])


def test_ctrl_c_exits_130(monkeypatch, tmp_path, capsys):
    from sqs.runs import lm_pipeline

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(lm_pipeline, "load_lm", interrupted)
    assert main(["generate", str(tmp_path)]) == 130
    assert "interrupted" in capsys.readouterr().err


def test_a_bad_set_override_is_one_line(capsys):
    assert main(["train", "lm", "--set", "train.lr"]) == 2
    one_line_error(capsys, "--set")
    assert main(["train", "lm", "--set", "train.nope=1"]) == 2
    one_line_error(capsys, "nope")
    assert main(["train", "image", "--print-config", "--set", "noise_std=-1"]) == 2
    one_line_error(capsys, "noise_std")


def test_an_unknown_config_is_one_line(capsys):
    assert main(["train", "lm", "--config", "no-such-config"]) == 2
    one_line_error(capsys, "no-such-config", "tinystories-cpu")


def test_an_unusable_cache_names_the_flag(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert main(["data", "fetch", "tinystories", "--from", str(ts.sample_dir()), "--cache-dir",
                 str(blocker / "cache")]) == 2
    one_line_error(capsys, "--cache-dir", "SQS_CACHE_DIR")


def test_generate_and_sampling_flags_work(lm_run, capsys):
    assert main(["generate", str(lm_run), "--max-new-tokens", "3", "--top-k", "1", "--num-samples", "2"]) == 0
    out = capsys.readouterr().out
    assert out.count("--- sample") == 2


def test_a_damaged_checkpoint_is_one_line(lm_run, tmp_path, capsys):
    import shutil

    rd = tmp_path / "copy"
    shutil.copytree(lm_run, rd)
    model = rd / "model.safetensors"
    data = bytearray(model.read_bytes())
    data[-5] ^= 0xFF
    model.write_bytes(bytes(data))
    assert main(["generate", str(rd), "--max-new-tokens", "2"]) == 2
    one_line_error(capsys, "model.safetensors", "damaged")
    # an experiment loop does not count this run as finished, and re-running the command repairs it
    assert is_complete(rd) and not is_complete(rd, verify=True)


def test_a_second_writer_is_one_line(lm_run, tiny_toml, cache, capsys):
    with open(lm_run / "run.lock", "a+") as f:  # another open file description: flock conflicts
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        f.seek(0)
        f.truncate()
        f.write("4242\n")
        f.flush()
        try:
            assert main(train_lm(lm_run, tiny_toml, cache)) == 2
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
    one_line_error(capsys, "in use", "4242", str(lm_run))


def test_a_changed_lr_names_allow_change_and_the_flag_works(lm_run, tiny_toml, cache, capsys, tmp_path):
    import shutil

    rd = tmp_path / "run"
    shutil.copytree(lm_run, rd)
    assert main(train_lm(rd, tiny_toml, cache, "--set", "train.lr=1e-3")) == 2
    one_line_error(capsys, "--allow-change lr")
    with pytest.warns(Warning, match="changed"):
        assert main(train_lm(rd, tiny_toml, cache, "--set", "train.lr=1e-3", "--allow-change", "lr")) == 0
    assert [e["key"] for e in read_history(rd) if e["event"] == "config_change"] == ["lm.lr"]


def test_a_damaged_final_model_is_repaired_by_rerunning(lm_run, tiny_toml, cache, tmp_path, capsys):
    import shutil

    rd = tmp_path / "run"
    shutil.copytree(lm_run, rd)
    data = bytearray((rd / "model.safetensors").read_bytes())
    data[-5] ^= 0xFF
    (rd / "model.safetensors").write_bytes(bytes(data))
    assert not is_complete(rd, verify=True)
    with pytest.warns(Warning, match="damaged"):
        assert main(train_lm(rd, tiny_toml, cache)) == 0
    assert is_complete(rd, verify=True)


def test_nan_with_grad_clip_on_says_true_things_end_to_end(tiny_toml, cache, tmp_path, capsys):
    rd = tmp_path / "run"
    length = ["--steps", "40", "--set", "eval.eval_every=20"]  # first checkpoint at step 10
    assert main(train_lm(rd, tiny_toml, cache, *length, "--set", "train.lr=1e9")) == 1
    err = one_line_error(capsys, "--allow-change lr", str(rd), "no checkpoint")
    assert "clipping" not in err  # grad_clip is on in this config
    # the advice works: with a lower lr (allowed) the command starts again at step 0 and finishes
    assert main(train_lm(rd, tiny_toml, cache, *length, "--set", "train.lr=1e-3", "--allow-change", "lr")) == 0
    assert is_complete(rd)


# ----------------------------------------------------------------------------- validate before create


REFUSED_LATE = [
    (["--set", "model.context=100000"], "context"),
    (["--set", "gate_kwargs.p=0"], "p"),
    (["--set", "train.lr=-0.1"], "lr"),
    (["--set", "train.min_lr=1.0"], "min_lr"),
]


@pytest.mark.parametrize("bad,name", REFUSED_LATE, ids=[b[1] for b, _ in REFUSED_LATE])
def test_a_refused_lm_start_leaves_nothing_that_blocks_the_fix(bad, name, tiny_toml, cache, tmp_path, capsys):
    rd = tmp_path / "run"
    assert main(train_lm(rd, tiny_toml, cache, *bad)) == 2
    one_line_error(capsys, name)
    assert not (rd / "config.json").exists()
    assert main(train_lm(rd, tiny_toml, cache)) == 0
    assert is_complete(rd)


# ----------------------------------------------------------------------------- devices and the run's tokenizer


@pytest.mark.parametrize("device", ["banana", "cuda:7", pytest.param("cuda", marks=pytest.mark.skipif(
    torch.cuda.is_available(), reason="a GPU is visible: `cuda` exists here"))])
def test_a_device_that_does_not_exist_is_one_line_for_train_lm_and_generate(device, lm_run, tiny_toml, tmp_path,
                                                                           capsys):
    rd = tmp_path / "run"
    assert main([*train_lm(rd, tiny_toml, tmp_path / "no-cache"), "--device", device]) == 2
    one_line_error(capsys, f"--device {device}", "available here: cpu")
    assert not rd.exists()  # refused before any data or file
    assert main(["generate", str(lm_run), "--device", device, "--max-new-tokens", "2"]) == 2
    one_line_error(capsys, f"--device {device}", "available here: cpu")


def test_a_truncated_run_tokenizer_is_named_then_repaired_before_training(lm_run, tiny_toml, cache, tmp_path, capsys):
    import shutil

    rd = tmp_path / "run"
    shutil.copytree(lm_run, rd)
    tok = rd / "tokenizer.json"
    assert (rd / "tokenizer.json.sha256").is_file()  # written with it, registered in RUN_FILES
    good = tok.read_bytes()
    tok.write_bytes(good[: len(good) // 2])  # the truncated tokenizer
    assert main(["generate", str(rd), "--max-new-tokens", "2"]) == 2
    one_line_error(capsys, str(tok), "damaged", "sqs train lm", f"--run-dir {rd}")
    with pytest.warns(Warning, match="copied again"):
        assert main(train_lm(rd, tiny_toml, cache)) == 0  # the advised command repairs it (the run is finished)
    assert tok.read_bytes() == good
    assert main(["generate", str(rd), "--max-new-tokens", "2"]) == 0


def test_an_older_lm_run_dir_is_recognised_and_its_tokenizer_gets_a_hash(lm_run, tiny_toml, cache, tmp_path):
    """An LM run an older sqs wrote (no sqs-run.json, a tokenizer.json without its sha256, a dead
    PID in run.lock) is ours: the same command leaves its results as they are and records the
    tokenizer's sha256, and `generate` reads it."""
    import shutil

    from sqs.training.rundir import MARKER, ownership

    rd = tmp_path / "run"
    shutil.copytree(lm_run, rd)
    (rd / MARKER).unlink()
    (rd / "tokenizer.json.sha256").unlink()
    (rd / "run.lock").write_text("999999999\n")  # no such process
    assert ownership(rd) == "older"
    before = {n: (rd / n).read_bytes() for n in ("model.safetensors", "metrics.jsonl", "config.json", "tokenizer.json")}
    assert main(train_lm(rd, tiny_toml, cache)) == 0
    assert all((rd / n).read_bytes() == b for n, b in before.items())
    assert (rd / MARKER).is_file() and (rd / "tokenizer.json.sha256").is_file()
    assert main(["generate", str(rd), "--max-new-tokens", "2"]) == 0


# ----------------------------------------------------------------------------- library follow-ups


def test_old_gate_names_resume_as_the_same_run(tmp_path):
    rd = tmp_path / "run"
    rd.mkdir()
    (rd / "config.json").write_text(json.dumps({"model": {"gate": "identity", "d": 4}, "train": {"lr": 0.1}}))
    (rd / "checkpoint.safetensors").write_bytes(b"x")  # a run that trained
    # made by an sqs from before the mark (sqs-run.json): its history shows it is a run's
    (rd / "history.jsonl").write_text(json.dumps({"event": "start", "step": 0, "time": "2025-01-01", "pid": 1}) + "\n")
    prepare_run_dir(rd, {"model": {"gate": "bilinear", "d": 4}, "train": {"lr": 0.1}})
    with pytest.raises(RunConfigMismatch, match="model.d"):
        prepare_run_dir(rd, {"model": {"gate": "bilinear", "d": 8}, "train": {"lr": 0.1}})


def test_table1_skips_never_started_dirs_and_refuses_trained_ones_in_one_line(tmp_path):
    specs = plan_grid(tmp_path / "runs", datasets=["mnist"], gates=["sqs"], seeds=1, epochs=1)
    rd = specs[0].run_dir
    rd.mkdir(parents=True)
    (rd / "config.json").write_text(json.dumps({"seed": 99}))
    check_existing(specs)  # a refused start: not a run to protect
    (rd / "checkpoint.safetensors").write_bytes(b"x")
    with pytest.raises(RunConfigMismatch) as info:
        check_existing(specs)
    assert "\n" not in str(info.value) and "--runs-dir" in str(info.value)


def _write_ckpt(path: Path, tensors: dict, meta: dict) -> None:
    meta_json = json.dumps(meta)
    save_file(tensors, str(path), metadata={"meta": meta_json, "sqs_sha256": content_hash(tensors, meta_json)})


def _model_and_state():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = make_optimizer(model, TrainConfig(steps=1))
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    return model, opt


def test_a_checkpoint_without_a_step_is_a_clear_error(tmp_path):
    model, opt = _model_and_state()
    save_checkpoint(tmp_path / "checkpoint.safetensors", model, opt, {"run_loss": 0.0})
    with pytest.warns(Warning):
        with pytest.raises(CheckpointCorrupt, match="no usable checkpoint"):
            _resume_from(tmp_path, model, make_optimizer(model, TrainConfig(steps=1)))
    assert list(tmp_path.glob("checkpoint.safetensors.damaged-*"))


@pytest.mark.parametrize("edit", ["index", "names"])
def test_a_mismatched_optimizer_state_is_a_checkpoint_error(tmp_path, edit):
    model, opt = _model_and_state()
    save_checkpoint(tmp_path / "ok.safetensors", model, opt, {"step": 1})
    from safetensors.torch import load_file

    t = load_file(str(tmp_path / "ok.safetensors"))
    if edit == "index":
        t["optim.7.exp_avg"] = t.pop("optim.0.exp_avg")
    else:
        for k in [k for k in t if k.endswith("exp_avg_sq")]:
            del t[k]
    _write_ckpt(tmp_path / "bad.safetensors", t, {"step": 1})
    with pytest.raises(CheckpointError, match="optimizer state"):
        load_checkpoint(tmp_path / "bad.safetensors", model, make_optimizer(model, TrainConfig(steps=1)))
