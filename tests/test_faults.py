"""Faults injected on purpose into real runs of the real trainer (docs/reliability.md).

A tiny regression Task (a two-layer MLP on synthetic tensors) keeps every run well under a
second, so each fault is tried on a whole run: kill -9 and resume, flipped bits in a
checkpoint, damaged or deleted metrics, a second writer, a refused start, NaN, and a
deliberate learning-rate change on resume.

Issue 19 part B (the second half of this file): a folder holding a user's files is refused
untouched; OS errors on a run's files (mocked errno, and a real read-only and a real full file
system where a private mount namespace can be made) are one line, through `sqs train image` on a
tiny IDX dataset; Ctrl-C and SIGTERM during saves and reads; a grid whose parent is killed.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import os
import random
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from sqs.io import ConfigError, DataWarning, UserError
from sqs.training.checkpoint import (
    CheckpointCorrupt,
    NonFiniteState,
    load_checkpoint,
    load_weights,
    read_meta,
    save_checkpoint,
)
from sqs.training.rundir import (
    RunConfigMismatch,
    RunDirError,
    RunLock,
    RunLocked,
    allow_changes,
    is_complete,
    read_history,
    read_metrics,
)
from sqs.training.trainer import TrainConfig, TrainingDiverged, train

ROOT = Path(__file__).resolve().parents[1]
TIMING = ("elapsed_s", "examples_per_s")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread for the whole module, as the child processes get (OMP_NUM_THREADS=1): these
    models are too small to gain from more, and on a busy machine a second thread that waits for a
    core makes every step many times slower. The caller's count is restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class LinearTask:
    """y = x @ w + noise; batches drawn by step (like the real tasks), so replays are exact.

    `kill_at` SIGKILLs the process when step `kill_at` is drawn (kill -9 mid-run);
    `inf_at` puts inf in that step's batch (a non-finite loss); `nan_grad_at` makes that
    step's loss finite but its gradient NaN (non-finite weights after the update)."""

    unit = "examples"
    units_per_step = 16

    def __init__(self, kill_at: int | None = None, inf_at: int | None = None, nan_grad_at: int | None = None,
                 delay: float = 0.0):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(256, 8, generator=g)
        self.y = self.x @ torch.randn(8, 1, generator=g) + 0.1 * torch.randn(256, 1, generator=g)
        self.kill_at, self.inf_at, self.nan_grad_at, self.delay = kill_at, inf_at, nan_grad_at, delay
        self._step = -1

    def batch(self, step: int, micro: int = 0, rank: int = 0, world: int = 1):
        if step == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        if self.delay:
            time.sleep(self.delay)  # a slower run (a grid whose parent is killed while it trains)
        self._step = step
        idx = torch.randint(0, 256, (16,), generator=torch.Generator().manual_seed(1000 + step))
        x = self.x[idx]
        if step == self.inf_at:
            x = x * float("inf")
        return x, self.y[idx]

    def loss(self, model, batch):
        x, y = batch
        loss = F.mse_loss(model(x), y)
        if self._step == self.nan_grad_at:
            w = next(model.parameters())
            loss = loss + torch.sqrt(0.0 * w.sum())  # value + 0, gradient inf * 0 = NaN
        return loss

    def evaluate(self, model):
        return {"test_loss": float(F.mse_loss(model(self.x), self.y))}


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))


def make_cfg(**kw) -> TrainConfig:
    base = dict(steps=20, lr=1e-2, eval_every=5, checkpoint_every=4)
    base.update(kw)
    return TrainConfig(**base)


def run(run_dir, task=None, cfg=None, **kw) -> list[dict]:
    return train(make_model(), task or LinearTask(), cfg or make_cfg(), run_dir, progress=False, **kw)


def strip(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = load_weights(a), load_weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, list[dict]]:
    """One uninterrupted run: what every recovered run must equal."""
    d = tmp_path_factory.mktemp("ref") / "run"
    return d, run(d)


def flip_a_bit(path: Path) -> None:
    """Flip one bit inside the tensor data: the file stays valid safetensors, one float changes."""
    raw = bytearray(path.read_bytes())
    start = 8 + int.from_bytes(raw[:8], "little")
    raw[start + (len(raw) - start) // 2] ^= 0x40
    path.write_bytes(bytes(raw))


def _child(run_dir: Path, kill_at: int, code: str | None = None) -> subprocess.CompletedProcess:
    code = code or ("import sys; sys.path.insert(0, sys.argv[1]); import test_faults as t; "
                    "t.run(sys.argv[2], t.LinearTask(kill_at=int(sys.argv[3])))")
    return subprocess.run([sys.executable, "-c", code, str(ROOT / "tests"), str(run_dir), str(kill_at)],
                          env=_child_env(), capture_output=True, text=True, timeout=300)


def _child_env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1", "SQS_BACKEND": "eager"}


# ----------------------------------------------------------------------------- kill -9


def test_kill_9_at_several_steps_then_resume_equals_an_uninterrupted_run(tmp_path, reference):
    ref_dir, ref = reference
    d = tmp_path / "run"
    for kill_at in (3, 10, 17):  # before the first checkpoint, just after an evaluation, late
        p = _child(d, kill_at)
        assert p.returncode == -signal.SIGKILL, p.stderr
        assert not is_complete(d)
    recs = run(d)
    assert strip(recs) == strip(ref)
    assert strip(read_metrics(d)) == strip(ref)  # replayed records are not duplicated in the live file
    assert same_weights(d / "model.safetensors", ref_dir / "model.safetensors")
    starts = [e["step"] for e in read_history(d) if e["event"] == "start"]
    assert starts == [0, 0, 8, 16]  # each resume began at the last checkpoint (every 4 steps)


# ----------------------------------------------------------------------------- integrity


def test_a_bit_flipped_checkpoint_is_refused_and_the_previous_one_used(tmp_path, reference):
    ref_dir, ref = reference
    d = tmp_path / "run"
    run(d, stop_after=13)  # checkpoints at 8 and 12
    ck = d / "checkpoint.safetensors"
    assert read_meta(ck)["step"] == 12 and read_meta(d / "checkpoint.prev.safetensors")["step"] == 8
    flip_a_bit(ck)
    read_meta(ck)  # still a valid safetensors file: only the hash tells
    with pytest.raises(CheckpointCorrupt, match=r"checkpoint\.safetensors is damaged"):
        load_checkpoint(ck, make_model())
    with pytest.warns(DataWarning, match=r"checkpoint\.safetensors is damaged.*trying the previous"):
        recs = run(d)
    assert strip(recs) == strip(ref)
    assert same_weights(d / "model.safetensors", ref_dir / "model.safetensors")
    assert (d / "checkpoint.safetensors.damaged-1").exists()  # kept aside, not deleted
    assert any(e["event"] == "checkpoint_fallback" and e["step"] == 8 for e in read_history(d))


def test_a_damaged_final_model_is_refused_and_rewritten_from_the_checkpoint(tmp_path, reference):
    ref_dir, _ = reference
    d = tmp_path / "run"
    run(d)
    flip_a_bit(d / "model.safetensors")
    with pytest.raises(CheckpointCorrupt, match="model.safetensors"):
        load_weights(d / "model.safetensors")
    with pytest.warns(DataWarning, match="model.safetensors is damaged"):
        run(d)
    assert same_weights(d / "model.safetensors", ref_dir / "model.safetensors")
    assert (d / "model.safetensors.damaged-1").exists()


def test_both_checkpoints_damaged_is_a_clear_error(tmp_path):
    d = tmp_path / "run"
    run(d, stop_after=13)
    flip_a_bit(d / "checkpoint.safetensors")
    flip_a_bit(d / "checkpoint.prev.safetensors")
    with pytest.warns(DataWarning), pytest.raises(CheckpointCorrupt, match="no usable checkpoint") as e:
        run(d)
    assert isinstance(e.value, UserError) and "\n" not in str(e.value)


def test_non_finite_state_is_never_written(tmp_path):
    model = make_model()
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteState, match=r"0\.weight"):
        save_checkpoint(tmp_path / "c.safetensors", model)
    assert not (tmp_path / "c.safetensors").exists()


def test_files_without_a_hash_still_load(tmp_path):
    """Run directories written before checksums existed keep working."""
    from safetensors.torch import save_file

    model = make_model()
    path = tmp_path / "old.safetensors"
    save_file({f"model.{k}": v for k, v in model.state_dict().items()}, str(path), metadata={"meta": '{"step": 3}'})
    with pytest.warns(DataWarning, match="no content hash"):
        assert load_checkpoint(path, make_model()) == {"step": 3}


# ----------------------------------------------------------------------------- history


def test_a_damaged_metrics_line_loses_no_other_record(tmp_path, reference):
    _, ref = reference
    d = tmp_path / "run"
    run(d)
    path = d / "metrics.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    original = "".join(lines[:2]) + lines[2][:17] + "\n" + "".join(lines[3:])  # a partial write on line 3
    path.write_text(original)
    with pytest.warns(DataWarning, match=r"line\(s\) 3 damaged"):
        recs = read_metrics(d)  # a finished run is still readable ...
    assert strip(recs) == strip(ref[:2] + ref[3:])
    with pytest.warns(DataWarning, match=r"line\(s\) 3 are damaged.*metrics\.jsonl\.damaged-1"):
        again = run(d)  # ... and re-running it repairs the live file, keeping the damaged one aside
    assert strip(again) == strip(ref[:2] + ref[3:])
    assert (d / "metrics.jsonl.damaged-1").read_text() == original
    assert is_complete(d) and strip(read_metrics(d)) == strip(ref[:2] + ref[3:])


def test_a_damaged_line_before_the_checkpoint_resumes_and_keeps_the_rest(tmp_path, reference):
    _, ref = reference
    d = tmp_path / "run"
    run(d, stop_after=13)  # checkpoint at 12, records 0, 5, 10
    path = d / "metrics.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text(lines[0] + "{garbage\n" + "".join(lines[2:]))
    with pytest.warns(DataWarning, match=r"line\(s\) 2"):
        recs = run(d)
    assert strip(recs) == strip(ref[:1] + ref[2:])
    assert is_complete(d)


def test_a_deleted_metrics_file_is_reported_and_the_final_record_recomputed(tmp_path, reference):
    _, ref = reference
    d = tmp_path / "run"
    run(d)
    (d / "metrics.jsonl").unlink()
    assert not is_complete(d)
    with pytest.warns(DataWarning, match=r"no record of step\(s\) 0, 5, 10, 15.*cannot be recomputed"):
        recs = run(d)
    assert is_complete(d)
    assert len(recs) == 1 and recs[0]["final"] and recs[0]["recomputed"] and recs[0]["step"] == 20
    assert recs[0]["test_loss"] == ref[-1]["test_loss"]  # evaluated again from the final checkpoint


# ----------------------------------------------------------------------------- one writer


def test_a_second_writer_is_refused_naming_the_pid_and_a_stale_lock_does_not_block(tmp_path, reference):
    _, ref = reference
    d = tmp_path / "run"
    code = ("import sys, time; from sqs.training.rundir import RunLock; RunLock(sys.argv[1]).acquire(); "
            "print('locked', flush=True); time.sleep(60)")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    holder = subprocess.Popen([sys.executable, "-c", code, str(d)], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunLocked, match=rf"{d}.*process {holder.pid}") as e:
            run(d)
        assert e.value.pid == holder.pid and "\n" not in str(e.value)
    finally:
        holder.kill()  # SIGKILL: the lock file stays behind with its PID in it
        holder.wait()
    assert (d / "run.lock").read_text().strip() == str(holder.pid)
    assert strip(run(d)) == strip(ref)


def test_the_lock_is_released_when_training_stops(tmp_path):
    d = tmp_path / "run"
    with pytest.raises(TrainingDiverged):
        run(d, LinearTask(inf_at=2))
    with RunLock(d):  # free again
        pass


# ----------------------------------------------------------------------------- refused starts


def test_bad_numbers_are_refused_before_anything_is_written():
    for bad in (dict(lr=-1e-3), dict(lr=float("nan")), dict(steps=0), dict(weight_decay=-0.1),
                dict(grad_clip=-1.0), dict(warmup_steps=-1), dict(betas=(0.9, 1.0))):
        with pytest.raises(ConfigError):
            make_cfg(**bad)


def test_a_refused_start_leaves_a_reusable_directory(tmp_path, reference):
    from sqs.training.rundir import prepare_run_dir

    _, ref = reference
    d = tmp_path / "run"
    # what an experiment does: config.json first, then building the model fails (p = 0, say)
    prepare_run_dir(d, {"train": {"lr": 1e-2}, "gate_kwargs": {"p": 0}})
    with pytest.warns(DataWarning, match="never trained"):
        assert strip(run(d)) == strip(ref)  # the corrected command is accepted
    assert json.loads((d / "config.json.not-started-1").read_text())["gate_kwargs"] == {"p": 0}
    # a run that has trained still refuses another config
    with pytest.raises(RunConfigMismatch, match="different config"):
        run(d, cfg=make_cfg(steps=30))


# ----------------------------------------------------------------------------- NaN


def test_nan_with_no_checkpoint_says_there_is_none(tmp_path):
    d = tmp_path / "run"
    with pytest.raises(TrainingDiverged) as e:
        run(d, LinearTask(inf_at=2))
    msg = str(e.value)
    assert "at step 2" in msg and "no checkpoint had been written" in msg and "is kept" not in msg
    assert "--allow-change lr" in msg and "grad_clip > 0" in msg  # clipping is off: suggesting it is true
    assert e.value.checkpoint_step is None and not (d / "checkpoint.safetensors").exists()


def test_nan_with_grad_clip_on_does_not_advise_enabling_it(tmp_path):
    with pytest.raises(TrainingDiverged) as e:
        run(tmp_path / "run", LinearTask(inf_at=6), make_cfg(grad_clip=1.0))
    msg = str(e.value)
    assert "at step 6" in msg and "last good checkpoint, checkpoint.safetensors (step 4)" in msg
    assert "clipping" not in msg and "--allow-change grad_clip" not in msg and e.value.checkpoint_step == 4


def test_nan_after_blown_up_weights_says_start_over_not_resume(tmp_path):
    """A checkpoint whose weights already exploded is not offered as a good place to resume."""
    with pytest.raises(TrainingDiverged) as e:
        run(tmp_path / "run", LinearTask(inf_at=10), make_cfg(lr=1e6, weight_decay=0.0))
    msg = str(e.value)
    assert "at step 10" in msg and "start over" in msg and "times larger than at the start" in msg
    assert "allow that change" not in msg  # the lr-change-and-resume advice would diverge again
    with pytest.raises(TrainingDiverged) as e:  # a sane lr keeps the resume advice
        run(tmp_path / "sane", LinearTask(inf_at=10), make_cfg())
    assert "start over" not in str(e.value) and "--allow-change lr" in str(e.value)


def test_non_finite_weights_are_not_kept_as_good(tmp_path):
    d = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match=r"weight became inf or NaN at step 8.*step 4\)") as e:
        run(d, LinearTask(nan_grad_at=7))  # the update of step 7 makes the weights NaN; step 8 saves
    assert read_meta(d / "checkpoint.safetensors")["step"] == 4 and e.value.checkpoint_step == 4
    load_checkpoint(d / "checkpoint.safetensors", make_model())  # what is kept verifies and is finite


def test_after_nan_an_allowed_lr_change_resumes_before_the_bad_step_and_is_recorded(tmp_path):
    d = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match=r"step 8\) holds the weights that gave it.*step 4\)"):
        run(d, LinearTask(inf_at=8))  # checkpoint 8 is written, then step 8's loss is inf
    with pytest.raises(RunConfigMismatch, match="--allow-change lr"):
        run(d, cfg=make_cfg(lr=5e-3))  # a changed lr needs the opt-in
    recs = run(d, cfg=make_cfg(lr=5e-3), allow_changes=("lr",))
    assert recs[-1]["final"] and is_complete(d)
    hist = read_history(d)
    change = [e for e in hist if e["event"] == "config_change"]
    assert [(c["key"], c["old"], c["new"], c["step"]) for c in change] == [("train.lr", 1e-2, 5e-3, 4)]
    assert [e["step"] for e in hist if e["event"] == "start"][-1] == 4
    assert read_meta(d / "checkpoint.safetensors.diverged-1")["step"] == 8  # kept aside, not deleted
    assert json.loads((d / "config.json").read_text())["train"]["lr"] == 5e-3


def test_allow_changes_context_and_its_limits(tmp_path):
    d = tmp_path / "run"
    run(d, stop_after=5)
    with allow_changes("grad_clip"):
        run(d, cfg=make_cfg(grad_clip=1.0), stop_after=3)
    assert [e["key"] for e in read_history(d) if e["event"] == "config_change"] == ["train.grad_clip"]
    with pytest.raises(RunDirError, match="only lr, min_lr, grad_clip"):
        run(d, cfg=make_cfg(steps=40), allow_changes=("steps",))


def test_user_errors_are_one_line(tmp_path):
    for exc in (RunLocked("x", 1), RunConfigMismatch("x"), CheckpointCorrupt("x"), ConfigError("x")):
        assert isinstance(exc, UserError)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ConfigError) as e:
            make_cfg(lr=0)
    assert str(e.value) == "TrainConfig: `lr` must be a finite number > 0, got 0"


# ============================================================================= issue 19, part B
#
# `sqs train image` on a tiny IDX dataset (256 training images, a 16-wide one-layer model: 16 steps,
# checkpoints at steps 8 and 16) stands for every command that trains a run.

from sqs.cli import main  # noqa: E402
from sqs.training import checkpoint as checkpoint_module  # noqa: E402
from sqs.training.rundir import MARKER, NotOurs, RunFileError, ownership, prepare_run_dir  # noqa: E402
from sqs.training.signals import Terminated, graceful_sigterm  # noqa: E402

from conftest import write_image_dataset  # noqa: E402


@pytest.fixture(scope="module")
def idx(tmp_path_factory) -> Path:
    return write_image_dataset(tmp_path_factory.mktemp("idx") / "mnist")


def image_argv(run_dir, data: Path, *extra: str) -> list[str]:
    return ["train", "image", "--config", "sec41", "--data-dir", str(data), "--run-dir", str(run_dir),
            "--batch-size", "32", "--epochs", "2", "--set", "model.d_model=16", "--set", "model.d_hidden=16",
            "--no-progress", *extra]


def one_line(capsys, *names: str) -> str:
    """stderr is one `sqs: error:` line (no traceback) naming each of `names`, and no corruption verdict."""
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1 and err.startswith("sqs: error:"), err
    for n in names:
        assert n in err, (n, err)
    assert "corrupt" not in err and "damaged" not in err, err
    return err


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def leftovers(run_dir: Path) -> list[str]:
    """Temporary files and files set aside in a run directory (a stop must leave none of either)."""
    return sorted(p.name for p in run_dir.iterdir()
                  if p.name.startswith(".") or ".damaged-" in p.name or ".diverged-" in p.name)


# ----------------------------------------------------------------------------- item 1: whose folder


@pytest.mark.usefixtures("eager_backend")
def test_a_folder_of_user_files_is_refused_and_every_byte_stays(tmp_path, idx, capsys):
    """The issue's case: a user's config.json, README.md and train.py were renamed `*.not-started-1`."""
    p = tmp_path / "p"
    p.mkdir()
    (p / "config.json").write_text('{"name":"app"}\n')
    (p / "README.md").write_text("hi\n")
    (p / "train.py").write_text("1\n")
    before = snapshot(p)
    assert main(image_argv(p, idx)) == 2
    one_line(capsys, str(p), "README.md", "config.json", "train.py", "--run-dir", "nothing was changed")
    assert snapshot(p) == before  # every byte in place, and nothing added (not even run.lock)
    (p / "README.md").unlink()
    (p / "train.py").unlink()  # a config.json alone is not ours either
    assert main(image_argv(p, idx)) == 2
    one_line(capsys, "config.json")
    assert snapshot(p) == {"config.json": before["config.json"]}
    (p / "config.json").unlink()  # an empty folder is: it is marked and trained in
    assert main(image_argv(p, idx)) == 0
    assert (p / MARKER).is_file() and is_complete(p)


def test_an_empty_run_dir_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # what `--run-dir ""` used to train into
    for argv in (["train", "image", "--run-dir", ""], ["train", "lm", "--run-dir", " "],
                 ["train", "image", "--runs-dir", ""], ["generate", ""]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "empty path" in err, err
    with pytest.raises(RunDirError, match="empty path"):
        train(make_model(), LinearTask(), make_cfg(), "", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_a_refused_start_is_reusable_only_in_a_folder_sqs_marked(tmp_path, reference):
    _, ref = reference
    user = tmp_path / "user"
    user.mkdir()
    (user / "config.json").write_text('{"train": {"steps": 20, "lr": 1}}')  # looks like a config, is not ours
    with pytest.raises(NotOurs, match="config.json"):
        prepare_run_dir(user, {"train": {"lr": 1e-2}})
    assert sorted(os.listdir(user)) == ["config.json"]
    d = tmp_path / "ours"
    prepare_run_dir(d, {"train": {"lr": 1e-2}, "gate_kwargs": {"p": 0}})  # a start refused after its config
    assert (d / MARKER).is_file() and ownership(d) == "marked"
    (d / "notes.txt").write_text("mine")  # a user's file dropped into a run directory: refused, kept
    with pytest.raises(NotOurs, match="notes.txt"):
        run(d)
    (d / "notes.txt").unlink()
    with pytest.warns(DataWarning, match="never trained"):
        assert strip(run(d)) == strip(ref)


def test_a_run_dir_made_before_the_mark_is_recognised(tmp_path, reference):
    """Older versions wrote no sqs-run.json. A folder without one is ours when nothing in it is foreign
    and something shows sqs wrote it: an image or LM run's config.json, a checkpoint with sqs's header,
    or a history of sqs events. The runs of /work/runs are such folders (146 of them, checked by hand)."""
    _, ref = reference
    old = tmp_path / "old"
    run(old, stop_after=13)  # a run interrupted under an older sqs: its files, without the mark
    (old / MARKER).unlink()
    (old / "history.jsonl").unlink()  # older still: no history either; the checkpoint's header tells
    assert ownership(old) == "older"
    assert strip(run(old)) == strip(ref)
    assert (old / MARKER).is_file() and read_history(old)[0]["event"] == "marked"
    start = tmp_path / "older-refused-start"  # an image run's config.json and its lock: a refused start
    start.mkdir()
    (start / "config.json").write_text(json.dumps({"kind": "image", "dataset": "mnist", "seed": 0, "model": {},
                                                   "train": {}, "resolved": {}}))
    (start / "run.lock").write_text("")
    assert ownership(start) == "older"
    with pytest.warns(DataWarning, match="never trained"):
        prepare_run_dir(start, {"train": {"lr": 1e-2}})
    assert (start / "config.json.not-started-1").exists()
    fake = tmp_path / "fake"  # registered names, nothing sqs wrote: not ours, untouched
    fake.mkdir()
    (fake / "checkpoint.safetensors").write_bytes(b"not a checkpoint")
    (fake / "history.jsonl").write_text('{"note": "mine"}\n')
    with pytest.raises(NotOurs, match="checkpoint.safetensors, history.jsonl"):
        ownership(fake)
    with pytest.raises(NotOurs):
        run(fake)
    assert sorted(os.listdir(fake)) == ["checkpoint.safetensors", "history.jsonl"]


def _dead_pid() -> int:
    """The PID of a process that has ended (what an older sqs killed mid-run left in run.lock)."""
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def _as_older(run_dir: Path, dead_pid: int) -> None:
    """Make `run_dir` what an sqs from before the mark left: no sqs-run.json, a dead PID in run.lock."""
    (run_dir / MARKER).unlink()
    (run_dir / "run.lock").write_text(f"{dead_pid}\n")


@pytest.mark.usefixtures("eager_backend")
def test_an_older_image_run_dir_is_skipped_untouched_or_resumed_as_before(tmp_path, idx, monkeypatch):
    """The run directories a grid of an older sqs wrote (config.json, checkpoint.safetensors,
    checkpoint.prev.safetensors, history.jsonl, metrics.jsonl, model.safetensors, timing.json and a
    run.lock holding a dead process's PID; no sqs-run.json) are ours: a grid skips a finished one
    without writing anything there, the same command leaves its results as they are, and an
    interrupted one resumes to the uninterrupted result."""
    from sqs.runs import image_pipeline
    from sqs.runs.pool import RunSpec, launch

    dead = _dead_pid()
    ref = tmp_path / "ref"
    assert main(image_argv(ref, idx)) == 0
    done = tmp_path / "done"
    shutil.copytree(ref, done)
    _as_older(done, dead)
    assert sorted(os.listdir(done)) == ["checkpoint.prev.safetensors", "checkpoint.safetensors", "config.json",
                                        "history.jsonl", "metrics.jsonl", "model.safetensors", "run.lock",
                                        "timing.json"]
    assert ownership(done) == "older"
    before = snapshot(done)

    def must_not_train(spec, **kw):
        raise AssertionError(f"{spec.name} is finished and was trained again")

    summary = launch([RunSpec("done", done, None)], must_not_train, progress=False)
    assert summary["n_skipped"] == 1 and summary["failed"] == [] and snapshot(done) == before
    assert main(image_argv(done, idx)) == 0  # the same command: nothing to train, no result changed
    after = snapshot(done)
    kept = ("checkpoint.prev.safetensors", "checkpoint.safetensors", "config.json", "metrics.jsonl",
            "model.safetensors")
    assert all(after[n] == before[n] for n in kept) and not leftovers(done) and MARKER in after
    part = tmp_path / "part"  # an older run stopped after its first checkpoint (step 8 of 16)
    with monkeypatch.context() as m:
        m.setattr(image_pipeline, "run_image", functools.partial(image_pipeline.run_image, stop_after=8))
        assert main(image_argv(part, idx)) == 0
    _as_older(part, dead)
    assert not is_complete(part) and ownership(part) == "older"
    assert main(image_argv(part, idx)) == 0
    assert [e["step"] for e in read_history(part) if e["event"] == "start"] == [0, 8]  # resumed, not restarted
    assert same_weights(part / "model.safetensors", ref / "model.safetensors")
    assert strip(read_metrics(part)) == strip(read_metrics(ref))
    assert (part / MARKER).is_file() and not leftovers(part)
    assert not [n for n in os.listdir(part) if "not-started" in n]


# ----------------------------------------------------------------------------- item 2: OS errors


def _fail_open_of(name: str, err: int, monkeypatch) -> None:
    """os.open of a file whose name starts with `name` (its temporary, for atomic writes) fails with `err`."""
    real = os.open

    def fake(path, flags, *a, **k):
        base = os.path.basename(os.fsdecode(path))
        if base.startswith(name) or base.startswith("." + name + "."):
            raise OSError(err, os.strerror(err), os.fsdecode(path))
        return real(path, flags, *a, **k)

    monkeypatch.setattr(os, "open", fake)


def _fail_write_to(name: str, err: int, monkeypatch) -> None:
    """os.write to an open `name` fails with `err` and no file name (what a full disk or quota gives)."""
    real = os.write

    def fake(fd, data):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            target = ""
        if os.path.basename(target) == name:
            raise OSError(err, os.strerror(err))
        return real(fd, data)

    monkeypatch.setattr(os, "write", fake)


def _fail_lock(err: int, monkeypatch) -> None:
    """Opening run.lock fails with `err` (a folder the user may not write)."""
    import builtins

    from sqs.training import rundir

    def fake(path, *a, **k):
        if os.path.basename(os.fsdecode(path)) == "run.lock":
            raise OSError(err, os.strerror(err), os.fsdecode(path))
        return builtins.open(path, *a, **k)

    monkeypatch.setattr(rundir, "open", fake, raising=False)


def _fail_safetensors(err: int, monkeypatch) -> None:
    """safetensors' save_file fails with the I/O error it reports ("... (os error N)")."""
    from safetensors import SafetensorError

    def fake(*a, **k):
        raise SafetensorError(f"Error while serializing: I/O error: {os.strerror(err)} (os error {err})")

    monkeypatch.setattr(checkpoint_module, "save_file", fake)


OS_FAULTS = [  # (file, errno, how it fails, the fix the line must give)
    ("run.lock", errno.EACCES, _fail_lock, "--run-dir DIR"),
    ("metrics.jsonl", errno.EDQUOT, lambda e, m: _fail_write_to("metrics.jsonl", e, m), "re-run the same command"),
    ("checkpoint.safetensors", errno.EPERM, _fail_safetensors, "--run-dir DIR"),
    ("checkpoint.safetensors", errno.ENOSPC, _fail_safetensors, "re-run the same command"),  # the full disk
    ("config.json", errno.ENOSPC, lambda e, m: _fail_open_of("config.json", e, m), "re-run the same command"),
    ("config.json", errno.EROFS, lambda e, m: _fail_open_of("config.json", e, m), "writable file system"),
]


@pytest.mark.usefixtures("eager_backend")
@pytest.mark.parametrize("name,err,fail,fix", OS_FAULTS, ids=[f"{f[0]}-{errno.errorcode[f[1]]}" for f in OS_FAULTS])
def test_an_os_error_on_a_run_file_is_one_line_with_its_cause(name, err, fail, fix, tmp_path, idx, capsys,
                                                             monkeypatch):
    rd = tmp_path / "run"
    with monkeypatch.context() as m:
        fail(err, m)
        assert main(image_argv(rd, idx)) == 2
    line = one_line(capsys, name, os.strerror(err).lower(), fix)
    assert str(rd) in line
    assert not (rd.exists() and leftovers(rd))  # no temporary file, nothing set aside
    assert main(image_argv(rd, idx)) == 0 and is_complete(rd, verify=True)  # the fault gone, the run goes on


_MOUNTED = """
import json, os, shutil, sys
from pathlib import Path
from sqs.cli import main
from sqs.training.checkpoint import load_weights
sys.path.insert(0, sys.argv[5])
from test_faults import image_argv
ro, full, data, ref = map(Path, sys.argv[1:5])
out = {"ro_finished": main(image_argv(ro / "done", data)), "ro_new": main(image_argv(ro / "new", data)),
       "ro_new_made": (ro / "new").exists()}
st = os.statvfs(full)
(full / "filler").write_bytes(bytes(st.f_bavail * st.f_frsize - 250_000))  # room for one checkpoint, not two
out["full"] = main(image_argv(full / "run", data))
out["full_left"] = sorted(p.name for p in (full / "run").iterdir() if p.name.startswith("."))
(full / "filler").unlink()  # space freed: the same command resumes
out["resumed"] = main(image_argv(full / "run", data))
main(image_argv(ref, data))  # uninterrupted, in this process (same threads: the same sums, bit for bit)
a, b = load_weights(full / "run" / "model.safetensors"), load_weights(ref / "model.safetensors")
out["same_weights"] = a.keys() == b.keys() and all(bool((a[k] == b[k]).all()) for k in a)
print(json.dumps(out))
"""


def _can_mount(tmp_path: Path) -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = tmp_path / "probe"
    probe.mkdir()
    r = subprocess.run(["unshare", "-m", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {probe}"], capture_output=True)
    return r.returncode == 0


@pytest.mark.usefixtures("eager_backend")
def test_a_real_read_only_and_a_real_full_file_system_are_one_line_and_the_run_resumes(tmp_path, idx):
    """In a private mount namespace: a read-only bind mount holding a finished run, and a 1 MB tmpfs
    filled until one checkpoint fits but not two (skipped where unshare and mount are not allowed)."""
    if not _can_mount(tmp_path):
        pytest.skip("cannot make mounts here (needs unshare and mount rights)")
    ro, full = tmp_path / "ro", tmp_path / "full"
    full.mkdir()
    assert main(image_argv(ro / "done", idx)) == 0  # a finished run
    ref = tmp_path / "reference"
    script = (f"mount --bind {ro} {ro} && mount -o remount,ro,bind {ro} && mount -t tmpfs -o size=1m tmpfs {full} && "
              f"{shlex.quote(sys.executable)} -c {shlex.quote(_MOUNTED)} {ro} {full} {idx} {ref} {ROOT / 'tests'}")
    r = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, timeout=300,
                       env=_child_env())
    assert r.returncode == 0 and r.stdout.strip(), r.stdout + r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("sqs: error:")]
    assert "Traceback" not in r.stderr and len(lines) == 3, r.stderr
    assert out["ro_finished"] == out["ro_new"] == out["full"] == 2 and not out["ro_new_made"], out
    for ln in lines[:2]:
        assert "read-only file system" in ln and "--run-dir DIR" in ln and "damaged" not in ln, ln
    assert "run.lock" in lines[0]  # re-running a finished run: its lock cannot be taken
    assert "no space left on device" in lines[2] and "checkpoint.safetensors" in lines[2], lines[2]
    assert "re-run the same command" in lines[2] and "corrupt" not in lines[2], lines[2]
    assert out["full_left"] == [] and out["resumed"] == 0 and out["same_weights"], out


def test_a_run_dir_name_that_is_not_utf8_is_one_line_before_anything_runs(tmp_path, capsys):
    rd = tmp_path / os.fsdecode(b"run-\xff\xfe")
    assert main(["train", "lm", "--config", "tinystories-cpu", "--run-dir", str(rd), "--device", "cpu",
                 "--cache-dir", str(tmp_path / "no-cache")]) == 2  # refused before the data are looked at
    one_line(capsys, "not valid UTF-8", "name not encodable", "--run-dir")
    assert not rd.exists()
    with pytest.raises(RunFileError, match="not valid UTF-8"):
        run(rd)


@pytest.mark.parametrize("where", ["resume", "save"])
def test_an_interrupt_inside_a_checkpoint_read_is_not_damage(where, tmp_path, reference, monkeypatch):
    """Ctrl-C arriving while safetensors reads a tensor. Torch's tensor conversion swallows a pending
    KeyboardInterrupt and raises a ValueError instead; the stand-in below does the same where the
    handler runs, so the old code called that damage (and set a good checkpoint aside on resume)."""
    ref_dir, ref = reference
    d = tmp_path / "run"
    if where == "resume":
        run(d, stop_after=13)  # checkpoints at 8 and 12
    real, fired = checkpoint_module.safe_open, []

    class Interrupted:
        def __init__(self, *a, **k):
            self.f = real(*a, **k)

        def __enter__(self):
            self.h = self.f.__enter__()
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

        def metadata(self):
            return self.h.metadata()

        def keys(self):
            return self.h.keys()

        def get_tensor(self, key):
            if not fired:
                fired.append(key)
                try:
                    os.kill(os.getpid(), signal.SIGINT)
                    for _ in range(200):
                        time.sleep(0.001)  # the handler runs here, as it would inside torch's conversion
                except KeyboardInterrupt:
                    raise ValueError("could not determine the shape of object type 'torch.storage.UntypedStorage'")
            return self.h.get_tensor(key)

    monkeypatch.setattr(checkpoint_module, "safe_open", Interrupted)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(KeyboardInterrupt):
            run(d)
    assert fired and not [w for w in caught if issubclass(w.category, DataWarning)], [str(w.message) for w in caught]
    assert leftovers(d) == []  # nothing set aside as damaged, no temporary file
    assert read_meta(d / "checkpoint.safetensors")["step"] == (12 if where == "resume" else 4)
    monkeypatch.undo()
    assert strip(run(d)) == strip(ref) and same_weights(d / "model.safetensors", ref_dir / "model.safetensors")


# ----------------------------------------------------------------------------- item 3: SIGTERM


@pytest.mark.usefixtures("eager_backend")
def test_sigterm_stops_like_ctrl_c_with_one_line_and_status_143(tmp_path, idx):
    rd = tmp_path / "run"
    argv = image_argv(rd, idx, "--epochs", "12")  # 96 steps, a checkpoint every 8
    proc = subprocess.Popen([sys.executable, "-m", "sqs.cli", *argv], env=_child_env(), stderr=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (rd / "checkpoint.safetensors").exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(random.Random(0).uniform(0, 0.05))  # soon: on a fast machine 88 steps take a fraction of a second
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert proc.returncode == 143, (proc.returncode, err)
    assert "Traceback" not in err and len(lines) == 1 and "SIGTERM" in lines[0] and "re-run" in lines[0], err
    assert leftovers(rd) == [] and not is_complete(rd)
    assert main(image_argv(rd, idx, "--epochs", "12")) == 0 and is_complete(rd, verify=True)
    assert [e["step"] for e in read_history(rd) if e["event"] == "start"][-1] > 0  # resumed, not restarted


_KILL_IN_SAVE = """
import os, signal, sys
sys.path.insert(0, sys.argv[1])
import test_faults as t
from sqs.training import checkpoint
real, calls = checkpoint.save_file, []
def save_then_die(*a, **k):  # kill -9 after the temporary file is written, before it is renamed
    real(*a, **k)
    calls.append(1)
    if len(calls) == int(sys.argv[3]):
        os.kill(os.getpid(), signal.SIGKILL)
checkpoint.save_file = save_then_die
t.run(sys.argv[2])
"""


def test_temporary_files_of_a_kill_9_are_removed_by_the_next_run(tmp_path, reference):
    ref_dir, ref = reference
    d = tmp_path / "run"
    p = _child(d, 2, _KILL_IN_SAVE)  # killed while writing the checkpoint of step 8
    assert p.returncode == -signal.SIGKILL, p.stderr
    assert [n for n in os.listdir(d) if n.startswith(".checkpoint.safetensors.")], os.listdir(d)
    assert strip(run(d)) == strip(ref) and same_weights(d / "model.safetensors", ref_dir / "model.safetensors")
    assert leftovers(d) == []


def make_big_model() -> torch.nn.Module:
    """About 70k parameters: a save (0.8 MB with the optimizer state) outlasts a training step, so
    signals at random times mostly land inside a save."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256), torch.nn.ReLU(),
                               torch.nn.Linear(256, 1))


def signal_loop(run_dir: str, rounds: int, seed: int = 0) -> dict:
    """Train `run_dir` (a checkpoint at every step) and stop it `rounds` times, alternately with SIGINT
    and SIGTERM sent at a random time 0-250 ms after the call has claimed the run (so SIGTERM meets
    the trainer's handler, as it does in `sqs train`: before that the process has SIGTERM's default,
    which ends it, as any program); after each stop check that it was an
    interruption, that no file was set aside or called damaged, and that no temporary file is left.
    Then compare the last checkpoint with an uninterrupted run's at the same step. Run in a child
    process (a SIGTERM that is not handled ends the process)."""
    from sqs.training import trainer

    run_dir, rng = Path(run_dir), random.Random(seed)
    cfg = make_cfg(steps=100_000, eval_every=0, checkpoint_every=1, fractions=(1.0,))
    state = {"save": False, "read": False}
    stats = {"stops": {}, "in_save": 0, "in_read": 0, "bad": [], "steps": []}
    for name, key in (("save_checkpoint", "save"), ("load_checkpoint", "read")):
        real = getattr(trainer, name)

        def traced(*a, _real=real, _key=key, **k):
            state[_key] = True
            try:
                return _real(*a, **k)
            finally:
                state[_key] = False

        setattr(trainer, name, traced)
    asks: list = []
    ready, sent = threading.Event(), threading.Event()

    def sender() -> None:
        while True:
            ready.wait()
            ready.clear()
            delay, sig = asks.pop()
            time.sleep(delay)
            stats["in_save"] += state["save"]
            stats["in_read"] += state["read"]
            os.kill(os.getpid(), sig)
            sent.set()

    train(make_big_model(), LinearTask(), make_cfg(steps=2), run_dir.with_name("warm-up"), progress=False)
    real_claimed = trainer.claimed

    @contextlib.contextmanager
    def claimed_then_go(*a, **k):  # the sender's clock starts inside train's graceful_sigterm
        ready.set()
        with real_claimed(*a, **k) as d:
            yield d

    trainer.claimed = claimed_then_go
    threading.Thread(target=sender, daemon=True).start()
    for i in range(rounds):
        sig = (signal.SIGINT, signal.SIGTERM)[i % 2]
        asks.append((rng.uniform(0.0, 0.25), sig))
        sent.clear()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                train(make_big_model(), LinearTask(), cfg, run_dir, progress=False)
                outcome = "finished"
            except Terminated:
                outcome = "SIGTERM"
            except KeyboardInterrupt:
                outcome = "SIGINT"
            except Exception as e:  # noqa: BLE001 - what the test reports
                outcome = f"{type(e).__name__}: {e}"
        if outcome not in ("SIGINT", "SIGTERM"):  # the round ended before its signal: take it here
            with graceful_sigterm():
                try:
                    sent.wait()
                    time.sleep(0.1)
                except KeyboardInterrupt:
                    pass
        stats["stops"][outcome] = stats["stops"].get(outcome, 0) + 1
        if outcome != signal.Signals(sig).name:
            stats["bad"].append(f"round {i}: {outcome}")
        stats["bad"] += [f"round {i}: warning {w.message}" for w in caught if issubclass(w.category, DataWarning)]
        stats["bad"] += [f"round {i}: left {n}" for n in leftovers(run_dir)]
        if (run_dir / "checkpoint.safetensors").exists():  # (a stop before the first save leaves none)
            stats["steps"].append(read_meta(run_dir / "checkpoint.safetensors")["step"])
    trainer.claimed = real_claimed
    from safetensors.torch import load_file

    last = stats["steps"][-1]
    ref = run_dir.with_name("reference")
    train(make_big_model(), LinearTask(), cfg, ref, progress=False, stop_after=last)
    a, b = load_file(str(run_dir / "checkpoint.safetensors")), load_file(str(ref / "checkpoint.safetensors"))
    stats["same_as_uninterrupted"] = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    return stats


@pytest.mark.slow
def test_ctrl_c_and_sigterm_loops_during_saves_never_damage_anything(tmp_path):
    """20 Ctrl-Cs and 20 SIGTERMs at random times into a run that saves at every step."""
    code = ("import json, sys; sys.path.insert(0, sys.argv[1]); import test_faults as t; "
            "print(json.dumps(t.signal_loop(sys.argv[2], 40)))")
    p = _child(tmp_path / "run", 0, code)
    assert p.returncode == 0 and p.stdout.strip(), p.stdout + p.stderr
    stats = json.loads(p.stdout.strip().splitlines()[-1])
    assert stats["stops"] == {"SIGINT": 20, "SIGTERM": 20} and stats["bad"] == [], stats
    assert stats["same_as_uninterrupted"] and stats["steps"] == sorted(stats["steps"]), stats
    print(f"\nsignal loop: {stats['in_save']} of 40 signals arrived during a save, {stats['in_read']} during a "
          f"resume's read; checkpoint steps {stats['steps'][0]}..{stats['steps'][-1]}")


# ----------------------------------------------------------------------------- item 4: grids


def slow_run(spec, *, position: int, progress: bool) -> dict:
    """A pool `run_one`: the tiny run, `spec.cfg["delay"]` seconds per step (picklable for spawned workers)."""
    recs = train(make_model(), LinearTask(delay=spec.cfg["delay"]), make_cfg(steps=200), spec.run_dir, progress=False)
    return {"test_loss": recs[-1]["test_loss"]}


_GRID = """
import sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import test_faults as t
from sqs.runs.pool import RunSpec, launch
specs = [RunSpec(f"r{i}", Path(sys.argv[2]) / f"r{i}", {"delay": 0.05}) for i in range(2)]
launch(specs, t.slow_run, workers=2, threads=1, progress=False, launcher="processes")
"""


def _last_step(run_dir: Path) -> int:
    """The step of the last metrics record of `run_dir` (-1 if none)."""
    recs = read_metrics(run_dir) if (run_dir / "metrics.jsonl").exists() else []
    return max((r["step"] for r in recs), default=-1)


def _alive(pid: int) -> bool:
    """True while `pid` runs (a zombie waiting for a reaper has exited)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _started(run_dir: Path) -> int | None:
    """The PID of the process training `run_dir` once it has taken a step, else None."""
    try:
        pid = int((run_dir / "run.lock").read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if (run_dir / "metrics.jsonl").exists() else None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_grid_workers_stop_within_seconds_of_a_kill_9_of_their_parent(tmp_path):
    root = tmp_path / "runs"
    parent = subprocess.Popen([sys.executable, "-c", _GRID, str(ROOT / "tests"), str(root)], env=_child_env(),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 180
        while len(workers) < 2 and parent.poll() is None and time.monotonic() < deadline:
            workers = [pid for pid in (_started(root / f"r{i}") for i in range(2)) if pid]
            time.sleep(0.05)
        assert len(workers) == 2, parent.stderr.read() if parent.poll() is not None else "workers did not start"
        parent.kill()
        parent.wait()
        t0 = time.monotonic()
        at_kill = [_last_step(root / f"r{i}") for i in range(2)]
        while any(_alive(w) for w in workers) and time.monotonic() - t0 < 60:
            time.sleep(0.05)
        gone_after = time.monotonic() - t0
        assert not any(_alive(w) for w in workers), "workers still running 60 s after their parent died"
    finally:
        for w in workers:  # only the workers this test started, by PID
            if _alive(w):
                os.kill(w, signal.SIGKILL)
        if parent.poll() is None:
            parent.kill()
    # Stopped at once in steps, whatever the load (seconds depend on it: on an idle machine well under
    # one; with the cores taken by other work the interpreter's exit alone can take several): at most
    # one evaluation interval (5 steps, 0.25 s of this task) after the kill.
    assert all(_last_step(root / f"r{i}") <= at_kill[i] + 5 for i in range(2)), (at_kill, gone_after)
    from sqs.runs.pool import RunSpec, launch

    for i in range(2):
        assert leftovers(root / f"r{i}") == [] and not is_complete(root / f"r{i}")
    specs = [RunSpec(f"r{i}", root / f"r{i}", {"delay": 0.0}) for i in range(2)]
    summary = launch(specs, slow_run, workers=1, progress=False)  # the obvious re-run
    assert summary["failed"] == [] and summary["n_trained"] == 2
    assert all(is_complete(s.run_dir, verify=True) for s in specs)
    print(f"\nworkers gone {gone_after:.2f} s after a kill -9 of their parent")


def test_a_run_held_by_a_live_process_is_one_line_naming_it(tmp_path, capsys):
    from sqs.cli.experiment_commands import _exit_status
    from sqs.runs.pool import RunSpec, launch

    rd = tmp_path / "r0"
    code = ("import sys, time; from sqs.training.rundir import RunLock; RunLock(sys.argv[1]).acquire(); "
            "print('locked', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(rd)], env=_child_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        summary = launch([RunSpec("r0", rd, {"delay": 0.0})], slow_run, workers=1, progress=False)
    finally:
        holder.kill()
        holder.wait()
    (failed,) = summary["failed"]
    assert "\n" not in failed["error"] and f"process {holder.pid}" in failed["error"] and str(rd) in failed["error"]
    capsys.readouterr()
    assert _exit_status(summary) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"process {holder.pid}" in err and "retry" not in err, err
