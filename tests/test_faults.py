"""Faults injected on purpose into real runs of the real trainer (docs/reliability.md).

A tiny regression Task (a two-layer MLP on synthetic tensors) keeps every run well under a
second, so each fault is tried on a whole run: kill -9 and resume, flipped bits in a
checkpoint, damaged or deleted metrics, a second writer, a refused start, NaN, and a
deliberate learning-rate change on resume.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
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


class LinearTask:
    """y = x @ w + noise; batches drawn by step (like the real tasks), so replays are exact.

    `kill_at` SIGKILLs the process when step `kill_at` is drawn (kill -9 mid-run);
    `inf_at` puts inf in that step's batch (a non-finite loss); `nan_grad_at` makes that
    step's loss finite but its gradient NaN (non-finite weights after the update)."""

    unit = "examples"
    units_per_step = 16

    def __init__(self, kill_at: int | None = None, inf_at: int | None = None, nan_grad_at: int | None = None):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(256, 8, generator=g)
        self.y = self.x @ torch.randn(8, 1, generator=g) + 0.1 * torch.randn(256, 1, generator=g)
        self.kill_at, self.inf_at, self.nan_grad_at = kill_at, inf_at, nan_grad_at
        self._step = -1

    def batch(self, step: int, micro: int = 0, rank: int = 0, world: int = 1):
        if step == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
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


def _child(run_dir: Path, kill_at: int) -> subprocess.CompletedProcess:
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import test_faults as t; "
            "t.run(sys.argv[2], t.LinearTask(kill_at=int(sys.argv[3])))")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", code, str(ROOT / "tests"), str(run_dir), str(kill_at)],
                          env=env, capture_output=True, text=True, timeout=120)


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
