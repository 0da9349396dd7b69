"""The `ray` launcher: a tiny grid on a local Ray (2 CPUs), its driver killed mid-grid, run again,
ends with the local launcher's results, bit for bit; and what a cluster must share is checked.

Every Ray process a test starts lives in the session of the driver subprocess that started it
(start_new_session), so whatever outlives the test is found by that session id and killed by
PID; Ray's temporary files go to a folder of the test's own.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sqs.experiments.table1 import plan_grid
from sqs.runs.ray_launcher import RunsDirNotShared, judge_probes, probe_runs_dir
from sqs.training.rundir import is_complete, read_history, read_metrics

sys.path.insert(0, str(Path(__file__).parent))
from conftest import fill_image_cache  # noqa: E402

TINY = ["batch_size=32", "model.d_model=16", "model.d_hidden=16", "early_eval_every=0", "eval_points=6",
        "noise_std=0.3", "noise_relative=false", "train.lr=1e-2"]
GATES, SEEDS, EPOCHS = ["relu", "sqs"], 1, 3  # 2 runs of 24 steps, a checkpoint every 8

#: The first driver: the grid on a local Ray, each run held still after its first checkpoint (step 8), so
#: that the test kills the driver with runs half-way whatever the machine's speed.
KILLED_DRIVER = """
import sys, time
from pathlib import Path
from sqs.experiments.table1 import plan_grid
from sqs.runs.image_pipeline import train_spec
from sqs.runs.pool import launch
runs, cache, nice_log = sys.argv[1], sys.argv[2], sys.argv[3]

def run_one(spec, *, position, progress):  # shipped to the Ray workers by value
    import os
    import sqs.training.trainer as trainer
    with open(nice_log, "a") as f:
        f.write(f"{{os.nice(0)}}\\n")
    save = trainer.save_checkpoint

    def save_then_wait(path, *args, **kwargs):
        out = save(path, *args, **kwargs)
        if Path(path).name == "checkpoint.safetensors":
            time.sleep(600)
        return out

    trainer.save_checkpoint = save_then_wait
    return train_spec(spec, position=position, progress=progress, cache_dir=cache, loggers=("tensorboard",))

specs = plan_grid(runs, datasets=["mnist"], gates={gates!r}, seeds={seeds}, epochs={epochs}, overrides={tiny!r})
launch(specs, run_one, workers=2, progress=False, launcher="ray", launcher_options={{"cpus_per_run": 1}})
""".format(gates=GATES, seeds=SEEDS, epochs=EPOCHS, tiny=TINY)


def _session(sid: int) -> list[int]:
    """Live (not zombie) processes of session `sid`."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == sid and fields[0] != "Z":
                out.append(int(entry))
    return out


def _kill_session(sid: int) -> list[int]:
    left = _session(sid)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    return left


def _strip(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in ("elapsed_s", "examples_per_s")} for r in records]


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds leftover processes through /proc")
def test_a_killed_ray_grid_resumes_to_the_local_launchers_results(tmp_path, no_figures, eager_backend):
    pytest.importorskip("ray")
    pytest.importorskip("tensorboardX")
    from sqs.cli import main
    from sqs.experiments.table1_report import write_report

    cache = tmp_path / "cache"
    fill_image_cache(cache)
    ray_runs, local_runs = tmp_path / "ray-runs", tmp_path / "local-runs"
    specs = plan_grid(ray_runs, datasets=["mnist"], gates=GATES, seeds=SEEDS, epochs=EPOCHS, overrides=TINY)
    ray_tmp = tempfile.mkdtemp(prefix="sqsray", dir="/tmp")  # Ray's socket paths must stay short
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_TMPDIR=ray_tmp, RAY_AUTH_MODE="disabled", SQS_BACKEND="eager")  # eager: no compile step
    sessions = []
    try:
        # 1. the driver, killed when every run waits at its first checkpoint
        log, nice_log = tmp_path / "driver.log", tmp_path / "nice.txt"
        with open(log, "wb") as out:
            driver = subprocess.Popen([sys.executable, "-c", KILLED_DRIVER, str(ray_runs), str(cache),
                                       str(nice_log)], env=env, start_new_session=True, stdout=out,
                                      stderr=subprocess.STDOUT)
        sessions.append(driver.pid)
        deadline = time.monotonic() + 240
        while not all((s.run_dir / "checkpoint.safetensors").exists() for s in specs):
            assert driver.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "no run started on Ray"
            time.sleep(0.05)
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait()
        assert not any(is_complete(s.run_dir) for s in specs)
        # the runs kept the driver's priority (Ray's default would renice its workers by +15)
        assert nice_log.read_text().split() == [str(os.nice(0))] * len(specs)
        # Ray's processes end with their driver (its dashboard and runtime-env agents by our watchdog)
        deadline = time.monotonic() + 30
        while _session(driver.pid) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not _kill_session(driver.pid), "Ray processes outlived their killed driver"

        # 2. the same grid again, by the command line: it skips finished runs and resumes the others
        args = ["experiment", "table1", "--datasets", "mnist", "--gates", *GATES, "--seeds", str(SEEDS),
                "--epochs", str(EPOCHS), "--cache-dir", str(cache), "--no-progress"] + [
            a for o in TINY for a in ("--set", o)]
        err_log = tmp_path / "rerun.log"  # a file, not a pipe: Ray's processes may hold a pipe open a while
        with open(err_log, "wb") as out:
            rerun = subprocess.Popen([sys.executable, "-m", "sqs.cli", *args, "--runs-dir", str(ray_runs), "--out",
                                      str(tmp_path / "ray-out"), "--launcher", "ray", "--workers", "2", "--logger",
                                      "tensorboard"], env=env, start_new_session=True, stdout=out,
                                     stderr=subprocess.STDOUT)
        sessions.append(rerun.pid)
        rerun.wait(timeout=300)
        err = err_log.read_text()
        assert rerun.returncode == 0 and "0 failed" in err, err[-3000:]
        for s in specs:  # each run was held at its step-8 checkpoint when the driver died, and resumed there
            assert [e["step"] for e in read_history(s.run_dir) if e["event"] == "start"][-1] == 8, s.name

        # 3. the local launcher, in this process
        assert main([*args, "--runs-dir", str(local_runs), "--out", str(tmp_path / "local-out"), "--workers",
                     "1"]) == 0
        for s in specs:
            local = local_runs / s.run_dir.relative_to(ray_runs)
            a, b = load_file(s.run_dir / "model.safetensors"), load_file(local / "model.safetensors")
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), s.name
            assert _strip(read_metrics(s.run_dir)) == _strip(read_metrics(local)), s.name
        write_report(ray_runs, tmp_path / "ray-report")
        write_report(local_runs, tmp_path / "local-report")
        same = [json.loads((tmp_path / d / "table1.json").read_text())["records"] for d in ("ray-report",
                                                                                          "local-report")]
        assert same[0] == same[1] and len(same[0]) == len(GATES) * SEEDS * 4

        # the killed runs' TensorBoard curves show every step once
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        for s in specs:
            acc = EventAccumulator(str(s.run_dir / "tensorboard"))
            acc.Reload()
            assert [e.step for e in acc.Scalars("train/loss")] == list(range(1, 25)), s.name
    finally:
        for sid in sessions:
            if sid is not None:
                _kill_session(sid)
        shutil.rmtree(ray_tmp, ignore_errors=True)


# ----------------------------------------------------------------------------- what a cluster must share


def test_a_runs_folder_a_node_cannot_see_or_lock_is_refused(tmp_path):
    import fcntl

    probe = tmp_path / ".probe"
    probe.write_text("token\n")
    with open(probe, "rb") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        # another process on a filesystem that shares locks finds the driver's lock held
        answer = subprocess.run([sys.executable, "-c", "import json, sys; from sqs.runs.ray_launcher import "
                                 "probe_runs_dir; print(json.dumps(probe_runs_dir(sys.argv[1], 'token')))",
                                 str(probe)], capture_output=True, text=True, check=True)
        here = json.loads(answer.stdout)
    assert here["seen"] and here["lock"] == "held"
    judge_probes(tmp_path, {"node a": here})  # accepted
    # a node whose lock is its own (the driver's lock is not seen there): the lock is free
    assert probe_runs_dir(str(probe), "token")["lock"] == "free"
    with pytest.raises(RunsDirNotShared, match="node b .*not seen there, so two nodes could train the same run"):
        judge_probes(tmp_path, {"node a": here, "node b": probe_runs_dir(str(probe), "token")})
    # a node that does not see the driver's file (a runs folder local to each node)
    with pytest.raises(RunsDirNotShared, match="node c .*does not see the driver's file.*same path on every node"):
        judge_probes(tmp_path, {"node c": probe_runs_dir(str(tmp_path / "elsewhere"), "token")})
    with pytest.raises(RunsDirNotShared, match="node d: a task could not run there .*install sqs"):
        judge_probes(tmp_path, {"node d": "RaySystemError: No module named 'sqs'"})


def test_ray_options_are_checked_and_a_missing_ray_names_the_extra(monkeypatch, capsys, tmp_path):
    from sqs.cli import main
    from sqs.runs.ray_launcher import RayUnavailable, check_options

    with pytest.raises(RayUnavailable, match="`cpus_per_run` must be a finite number > 0"):
        check_options(0, 0)
    assert main(["experiment", "table1", "--gpus-per-run", "1", "--runs-dir", str(tmp_path)]) == 2
    assert "--gpus-per-run only apply to --launcher ray" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "ray", None)  # as if not installed
    assert main(["experiment", "table1", "--launcher", "ray", "--runs-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install 'sqs[ray]'" in err and not list(tmp_path.iterdir())


def test_every_grid_command_takes_the_launcher_and_logger_flags():
    pytest.importorskip("ray")
    from sqs.cli import build_parser
    from sqs.cli.args import grid_launch, grid_threads

    parser = build_parser()
    for command in ("table1", "frontier", "gates", "tinystories"):
        args = parser.parse_args(["experiment", command, "--launcher", "ray", "--cpus-per-run", "2",
                                  "--gpus-per-run", "0.5", "--ray-address", "head:6379", "--logger", "tensorboard"])
        launch = grid_launch(args)
        assert launch == {"launcher": "ray", "loggers": ("jsonl", "tensorboard"),
                          "launcher_options": {"address": "head:6379", "cpus_per_run": 2.0, "gpus_per_run": 0.5}}
        assert grid_threads(args, launch) == 2
        local = grid_launch(parser.parse_args(["experiment", command]))
        assert local == {"launcher": None, "launcher_options": None, "loggers": ("jsonl",)}
