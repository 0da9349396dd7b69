"""The pool every list of runs goes through: finished runs skipped, failures collected, launchers by name."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sqs.runs.pool import LAUNCHERS, RunSpec, launch
from sqs.training.checkpoint import save_checkpoint


def finish(run_dir: Path) -> None:
    """What a finished run leaves: a final metrics record and verified final weights."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text(json.dumps({"step": 1, "final": True, "test_acc": 0.5}) + "\n")
    save_checkpoint(run_dir / "model.safetensors", torch.nn.Linear(2, 2), None, {"step": 1})


def run_one(spec: RunSpec, *, position: int, progress: bool) -> dict:
    """A top-level `run_one`: fails for the run named "bad", else finishes the run."""
    if spec.name == "bad":
        raise RuntimeError("a broken run")
    finish(spec.run_dir)
    return {"test_acc": 0.5, "position": position}


def test_finished_runs_are_skipped_and_a_failure_does_not_stop_the_others(tmp_path):
    specs = [RunSpec(name, tmp_path / name, None) for name in ("done", "bad", "new")]
    finish(tmp_path / "done")
    seen = []
    summary = launch(specs, run_one, progress=False, on_finish=lambda name, ok, info: seen.append((name, ok)),
                     log=tmp_path / "log" / "pool.jsonl")
    assert (summary["n_runs"], summary["n_skipped"], summary["n_trained"]) == (3, 1, 1)
    assert [f["run"] for f in summary["failed"]] == ["bad"] and "a broken run" in summary["failed"][0]["error"]
    assert seen == [("bad", False), ("new", True)] and summary["runs"]["new"]["wall_s"] >= 0
    logged = [json.loads(line) for line in (tmp_path / "log" / "pool.jsonl").read_text().splitlines()]
    assert len(logged) == 1 and logged[0]["n_trained"] == 1 and "runs" not in logged[0]
    again = launch(specs, run_one, progress=False, launcher="inline")
    assert again["n_skipped"] == 2 and [f["run"] for f in again["failed"]] == ["bad"]


def test_launchers_are_named():
    assert set(LAUNCHERS) >= {"inline", "processes", "ray"}
    with pytest.raises(ValueError, match="unknown launcher 'slurm'"):
        launch([], run_one, launcher="slurm")
