"""The `ray` launcher of the pool: each run of a grid as a Ray task, on this machine or a cluster.

    launch(specs, run_one, launcher="ray", launcher_options={"cpus_per_run": 1, "gpus_per_run": 0})
    sqs experiment table1 --launcher ray [--cpus-per-run 1] [--gpus-per-run 0] [--ray-address ADDR]

Ray only decides where `run_one(spec)` executes; what a run is stays the project's: finished
runs are skipped before anything is submitted (`sqs.runs.pool.launch`), an interrupted one
resumes from its checkpoint bit for bit, one writer per run is the run lock, whatever engine
started the process. So a grid whose driver was killed is resumed by running the same
command again; Ray's own task retries are off (a retry would be a second, unlocked copy of
the protocol).

Where Ray runs: `address` (`--ray-address`), else `RAY_ADDRESS`, else a local Ray started
here with `workers * cpus_per_run` CPUs and shut down at the end, whose tasks run at the
driver's priority (Ray's default renices workers by +15; a cluster sets it with
`RAY_worker_niceness=0 ray start ...`). Each task declares
`cpus_per_run` CPUs and `gpus_per_run` GPUs; Ray runs as many at once as the cluster holds.

What a cluster must give, checked before the first run (`check_runs_dir`): on every node
that can take a run, the runs folder at the same path, showing what the driver wrote, and a
run lock that holds across machines (a lock the driver holds must be seen as held there;
fcntl.flock on NFS v4 is, on some parallel filesystems only with a mount option). A set-up
that fails is refused in one line before any run starts (`RunsDirNotShared`), as is a
cluster with no node large enough for one run. docs/scale-out.md has the recipes.
"""

from __future__ import annotations

import math
import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Sequence

from sqs.io import UserError, write_text

#: How to install what this launcher needs.
RAY_EXTRA = "sqs[ray]"
#: Object store of a local Ray: the tasks pass only specs and small dicts (Ray's minimum is 75 MB).
LOCAL_OBJECT_STORE = 128 * 2**20
#: Environment variables a connected cluster's tasks get from the driver (a local Ray inherits them all).
FORWARDED_ENV = ("SQS_", "WANDB_")


class RayUnavailable(UserError):
    """`--launcher ray` without Ray installed, or with options it cannot use."""


class RunsDirNotShared(UserError):
    """A Ray cluster on which the runs folder, or its run lock, is not shared by every node."""


def require_ray():
    """The `ray` module, or RayUnavailable naming the extra that installs it."""
    try:
        import ray
    except ImportError as e:
        raise RayUnavailable(f"--launcher ray needs Ray, which is not installed ({e}); install it with: "
                             f"pip install '{RAY_EXTRA}' (or use --launcher local)") from None
    return ray


def check_options(cpus_per_run: float, gpus_per_run: float) -> None:
    """Resources of one run: CPUs > 0, GPUs >= 0 (fractions allowed, as Ray does)."""
    for name, val, rule in (("cpus_per_run", cpus_per_run, "> 0"), ("gpus_per_run", gpus_per_run, ">= 0")):
        number = isinstance(val, (int, float)) and not isinstance(val, bool) and math.isfinite(val)
        if not (number and (val > 0 if rule == "> 0" else val >= 0)):
            raise RayUnavailable(f"ray launcher: `{name}` must be a finite number {rule}, got {val!r}")


# ----------------------------------------------------------------------------- connecting


def connect(ray, address: str | None, num_cpus: int) -> bool:
    """Join `address`, else RAY_ADDRESS, else start a local Ray of `num_cpus` CPUs; True when
    this call started Ray (then the caller shuts it down). A Ray already initialised in this
    process is used as it is."""
    import logging

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or None
    common = dict(logging_level=logging.WARNING, log_to_driver=True)
    if address:
        env = {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV)}
        ray.init(address=address, runtime_env={"env_vars": env} if env else None, **common)
        return True
    # Ray renices its workers by +15 unless told otherwise; here the tasks are the work, so they keep the
    # driver's priority, as the local launcher's processes do (at +15 on a busy machine a grid crawls).
    ray.init(num_cpus=num_cpus, include_dashboard=False, object_store_memory=LOCAL_OBJECT_STORE,
             _system_config={"worker_niceness": 0}, **common)
    return True


def fits(nodes: list[dict], cpus_per_run: float, gpus_per_run: float) -> list[dict]:
    """The live nodes with enough CPUs and GPUs for one run."""
    return [n for n in nodes if n.get("Alive") and n.get("Resources", {}).get("CPU", 0) >= cpus_per_run
            and n.get("Resources", {}).get("GPU", 0) >= gpus_per_run]


# ----------------------------------------------------------------------------- the runs folder


def runs_root(todo: Sequence[Any]) -> Path:
    """The folder shared by the runs' directories (the parent of their common path)."""
    parents = [str(Path(s.run_dir).resolve().parent) for s in todo]
    return Path(os.path.commonpath(parents))


def probe_runs_dir(path: str, token: str) -> dict:
    """On one node: does `path` hold `token` (the driver's file), and is the lock the driver holds
    on it seen as held here? {"host", "seen", "lock": "held" | "free" | "<error>"}."""
    host = socket.gethostname()
    try:
        seen = Path(path).read_text().strip() == token
    except OSError as e:
        return {"host": host, "seen": False, "lock": f"unreadable: {e.strerror or e}"}
    if not seen:
        return {"host": host, "seen": False, "lock": "not checked"}
    try:
        import fcntl
    except ImportError:
        return {"host": host, "seen": True, "lock": "no fcntl on this system"}
    with open(path, "rb") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return {"host": host, "seen": True, "lock": "held"}
        except OSError as e:
            return {"host": host, "seen": True, "lock": f"flock failed: {e.strerror or e}"}
        fcntl.flock(f.fileno(), fcntl.LOCK_UN)
    return {"host": host, "seen": True, "lock": "free"}


def judge_probes(root: Path, probes: dict[str, dict | str]) -> None:
    """RunsDirNotShared naming every node whose probe failed (`probes`: node -> probe_runs_dir's
    answer, or the error text of a task that could not run there)."""
    bad = []
    for node, p in probes.items():
        if isinstance(p, str):
            bad.append(f"{node}: a task could not run there ({p}); install sqs (the same version) on every node")
        elif not p["seen"]:
            bad.append(f"{node} ({p['host']}): does not see the driver's file in {root}"
                       + (f" ({p['lock']})" if p["lock"].startswith("unreadable") else "")
                       + "; the runs folder must be one shared folder at the same path on every node")
        elif p["lock"] == "free":
            bad.append(f"{node} ({p['host']}): a lock the driver holds on {root} is not seen there, so two nodes "
                       "could train the same run; use a filesystem whose locks hold across machines (NFS v4; "
                       "Lustre mounted with -o flock)")
        elif p["lock"] != "held":
            bad.append(f"{node} ({p['host']}): the run lock cannot be taken in {root} ({p['lock']})")
    if bad:
        raise RunsDirNotShared(f"--launcher ray: the runs folder {root} cannot be used by this Ray cluster: "
                               + "; ".join(bad) + " (docs/scale-out.md)")


def check_runs_dir(ray, root: Path, cpus_per_run: float, gpus_per_run: float, timeout_s: float = 300.0) -> int:
    """Refuse (RunsDirNotShared) a cluster on which some node that can take a run does not share
    `root` or its locks; RayUnavailable if no node can take a run. Returns the number of such nodes.

    The driver writes a token file into `root` and holds an flock on it; a zero-CPU task pinned
    to each node reads the token and tries the lock (it must find it held)."""
    import fcntl

    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = fits(ray.nodes(), cpus_per_run, gpus_per_run)
    if not nodes:
        total = ray.cluster_resources()
        raise RayUnavailable(f"--launcher ray: no node of the Ray cluster has {cpus_per_run:g} CPU(s) and "
                             f"{gpus_per_run:g} GPU(s) for one run (the cluster has {total.get('CPU', 0):g} CPU(s), "
                             f"{total.get('GPU', 0):g} GPU(s) in all); lower --cpus-per-run / --gpus-per-run")
    token = uuid.uuid4().hex
    path = root / f".sqs-ray-probe-{token}"
    write_text(path, token + "\n")
    f = open(path, "rb")
    try:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            raise RunsDirNotShared(f"--launcher ray: the run lock cannot be taken in {root} on this machine "
                                   f"({e.strerror or e}); the runs folder needs a filesystem with working "
                                   "locks (docs/scale-out.md)") from None
        probe = ray.remote(probe_runs_dir)
        refs = {}
        for n in nodes:
            where = NodeAffinitySchedulingStrategy(node_id=n["NodeID"], soft=False)
            refs[f"node {n.get('NodeManagerAddress', n['NodeID'][:8])}"] = probe.options(
                num_cpus=0, scheduling_strategy=where, max_retries=0).remote(str(path), token)
        answers: dict[str, dict | str] = {}
        for node, ref in refs.items():
            try:
                answers[node] = ray.get(ref, timeout=timeout_s)
            except ray.exceptions.GetTimeoutError:
                answers[node] = f"no answer in {timeout_s:.0f} s"
            except ray.exceptions.RayError as e:
                answers[node] = " ".join(f"{type(e).__name__}: {e}".split())[:300]
    finally:
        f.close()
        path.unlink(missing_ok=True)
    judge_probes(root, answers)
    return len(nodes)


# ----------------------------------------------------------------------------- the runs


def run_task(run_one: Callable[..., dict], spec: Any, threads: int, gpus: float = 0) -> dict:
    """One run inside a Ray worker: `threads` intra-op threads, no progress bars (they would
    interleave in the driver's log); its final numbers with the wall time and the node.

    A run that reserved no GPU sees none (Ray leaves CUDA_VISIBLE_DEVICES alone for such a task,
    so `--device auto` would otherwise train on a GPU another run holds)."""
    import torch

    if not gpus and not torch.cuda.is_initialized():
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    torch.set_num_threads(max(1, int(threads)))
    t0 = time.perf_counter()
    info = run_one(spec, position=0, progress=False)
    return {"wall_s": time.perf_counter() - t0, **info, "node": socket.gethostname()}


def launch_ray(todo: Sequence[Any], run_one: Callable[..., dict], workers: int, threads: int, run_bars: bool,
               finished: Callable[[str, bool, Any], None], *, address: str | None = None,
               cpus_per_run: float = 1, gpus_per_run: float = 0) -> None:
    """The pool's `ray` launcher (signature of `sqs.runs.pool.LAUNCHERS`; see the module docstring).
    `workers` sizes a local Ray (workers * cpus_per_run CPUs); a cluster's own size rules otherwise.
    `run_bars` is unused: runs report through `finished` only."""
    check_options(cpus_per_run, gpus_per_run)
    ray = require_ray()
    local = not (ray.is_initialized() or address or os.environ.get("RAY_ADDRESS"))
    before = set(_descendants(os.getpid())) if local and os.path.isdir("/proc") else set()
    started = connect(ray, address, num_cpus=math.ceil(max(1, workers) * cpus_per_run))
    watchdog = reap_on_exit(before) if local else None
    pending: dict = {}
    try:
        check_runs_dir(ray, runs_root(todo), cpus_per_run, gpus_per_run)
        task = ray.remote(num_cpus=cpus_per_run, num_gpus=gpus_per_run, max_retries=0)(run_task)
        for s in todo:
            pending[task.options(name=f"sqs:{s.name}").remote(run_one, s, threads, gpus_per_run)] = s
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                spec = pending.pop(ref)
                try:
                    info = ray.get(ref)
                except ray.exceptions.RayTaskError as e:  # the run raised: its remote traceback
                    finished(spec.name, False, str(e))
                    continue
                except ray.exceptions.RayError as e:  # its worker died (out of memory, killed, node lost)
                    finished(spec.name, False, f"{type(e).__name__}: {e}")
                    continue
                finished(spec.name, True, info)
    finally:
        for ref in pending:  # interrupted: stop what is still running (each run resumes next time)
            try:
                ray.cancel(ref, force=True)
            except Exception:  # noqa: BLE001 - best effort on the way out
                pass
        if started:
            ray.shutdown()
        if watchdog is not None:
            watchdog.terminate()
            watchdog.wait(timeout=10)


# ----------------------------------------------------------------------------- a local Ray's leftovers


_WATCH = r"""
import os, signal, sys, time
parent, procs = int(sys.argv[1]), [p.split(":") for p in sys.argv[2:]]
while os.getppid() == parent:
    time.sleep(1.0)
time.sleep(2.0)  # Ray's own fate sharing ends most of its processes first
for pid, start in procs:
    try:
        with open(f"/proc/{pid}/stat") as f:
            same = f.read().rsplit(")", 1)[1].split()[19] == start
    except OSError:
        continue
    if same:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except OSError:
            pass
"""


def _descendants(root: int) -> list[tuple[int, str]]:
    """(pid, start time) of every live descendant of `root`, from /proc (Linux)."""
    children: dict[int, list[tuple[int, str]]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append((int(entry), fields[19]))
    out, todo = [], [root]
    while todo:
        for pid, start in children.get(todo.pop(), []):
            out.append((pid, start))
            todo.append(pid)
    return out


def reap_on_exit(before: set[tuple[int, str]]) -> subprocess.Popen | None:
    """A watchdog for a local Ray started here: if this process dies without shutting Ray down
    (kill -9), it kills the Ray processes that outlive it (Ray's dashboard and runtime-env agents
    are not fate-shared with their raylet). Only those processes: the descendants that were not
    there `before` Ray started, matched by PID and start time. None where /proc does not exist."""
    if not os.path.isdir("/proc"):
        return None
    procs = [f"{pid}:{start}" for pid, start in _descendants(os.getpid()) if (pid, start) not in before]
    return subprocess.Popen([sys.executable, "-c", _WATCH, str(os.getpid()), *procs], stdin=subprocess.DEVNULL,
                            start_new_session=True)
