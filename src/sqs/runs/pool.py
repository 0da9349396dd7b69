"""The pool every list of runs goes through: skip finished runs, train the rest in parallel.

    specs = [RunSpec.of(cfg, "runs") for cfg in cfgs]         # a label, a run directory, a config
    summary = launch(specs, run_one, workers=2, threads=1)   # run_one(spec, position=, progress=) -> dict

A run is described by a small picklable `RunSpec` and trained by `run_one`, a top-level
function (or a `functools.partial` of one) that returns the run's final numbers; so a
launcher only has to carry (spec, run_one) to wherever the run executes. `LAUNCHERS`:
`inline` (this process, one run after another), `processes` (`workers` spawned processes
pulling runs from a queue) and `ray` (a Ray task per run, on one machine or a cluster:
`sqs.runs.ray_launcher`, options in `launcher_options`); each calls the same `run_one` and
reports through the same `finished` callback.

Finished runs are skipped (`is_complete` with the weights verified), interrupted ones resume
(the trainer's contract), and a failed run is collected in the summary, not raised, so one
bad run does not stop the others. A run that fails with an error a person fixes (`UserError`: a
run another live process holds, a folder that is not a run's, a full disk) is summarised by its
one-line message; any other failure by its traceback (a bug).

Workers die with their launcher: each one stops gracefully (SIGTERM, raised as
`sqs.training.signals.Terminated` at a safe point: a save in progress completes) as soon as its
parent is gone, even after a `kill -9` of the parent (`signals.die_with_parent`), so no orphan keeps
training, and holding, a run that the next launch wants.

Parallelism: the models of the paper's grids are small (0.2 M parameters), too small for
intra-op threads to pay off, and OpenMP threads of one process wait on each other whenever
another job holds a core; so the default is one single-threaded worker per available core.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from sqs.io import UserError, append_jsonl
from sqs.training.rundir import is_complete
from sqs.training.signals import Terminated, die_with_parent, graceful_sigterm

#: run_one(spec, *, position: int, progress: bool) -> the run's final numbers (JSON-ready dict)
RunOne = Callable[..., dict]


@dataclass
class RunSpec:
    """One run of a list: its label (progress bars, logs, the summary), its directory, its config."""

    name: str
    run_dir: Path
    cfg: Any

    @classmethod
    def of(cls, cfg: Any, runs_root: str | Path) -> "RunSpec":
        """The spec of a run config (`cfg.label()`, `cfg.run_dir(runs_root)`)."""
        return cls(cfg.label(), cfg.run_dir(runs_root), cfg)


def default_workers() -> int:
    """One worker per CPU core this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def launch(specs: Sequence[RunSpec], run_one: RunOne, *, workers: int = 1, threads: int = 1, progress: bool = True,
           run_bars: bool = True, desc: str = "runs", on_finish: Callable[[str, bool, Any], None] | None = None,
           prepare: Callable[[list[RunSpec]], None] | None = None, log: str | Path | None = None,
           launcher: str | None = None, launcher_options: dict | None = None) -> dict:
    """Train every unfinished run of `specs`; return a summary ({"started", "n_runs", "n_skipped",
    "n_trained", "workers", "threads", "failed": [{"run", "error"}], "runs": {name: info}, "wall_s"}).

    `launcher` names one of LAUNCHERS (default: `inline` for one worker, `processes` for more);
    `launcher_options` are passed to it as keywords (the ray launcher's address, cpus_per_run, ...).
    `prepare(todo)` runs once before any worker starts (e.g. fetch a dataset the runs share);
    `on_finish(name, ok, info)` after each run (info: {"wall_s", **run_one's dict}, or the
    traceback of a failed run); `log` (a JSONL file) gets the summary without "runs" when
    something was trained."""
    from tqdm.auto import tqdm

    if launcher is not None and launcher not in LAUNCHERS:
        raise ValueError(f"pool: unknown launcher {launcher!r}; choose one of {', '.join(LAUNCHERS)}")
    todo = [s for s in specs if not is_complete(s.run_dir, verify=True)]
    summary = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "n_runs": len(specs), "n_skipped": len(specs) - len(todo),
               "n_trained": 0, "workers": 0, "threads": threads, "failed": [], "runs": {}}
    t0 = time.perf_counter()
    if todo and prepare is not None:
        prepare(todo)
    workers = max(1, min(workers, len(todo))) if todo else 0
    summary["workers"] = workers
    bar = tqdm(total=len(specs), initial=len(specs) - len(todo), desc=desc, unit="run", position=0,
               disable=not progress, dynamic_ncols=True)

    def finished(name: str, ok: bool, info: Any) -> None:
        if ok:
            summary["n_trained"] += 1
            summary["runs"][name] = info
            acc = info.get("test_acc")
            bar.set_postfix_str(f"{name}: acc {acc:.4f} in {info['wall_s']:.0f}s" if acc is not None else name)
        else:
            summary["failed"].append({"run": name, "error": info})
            sep = "\n" if "\n" in str(info) else " "  # a traceback below, a user error's one line beside
            tqdm.write(f"run {name} failed:{sep}{info}", file=sys.stderr)
        bar.update(1)
        if on_finish is not None:
            on_finish(name, ok, info)

    try:
        if todo:
            name = launcher or ("inline" if workers == 1 else "processes")
            summary["launcher"] = name
            LAUNCHERS[name](todo, run_one, workers, threads, run_bars and progress, finished,
                            **(launcher_options or {}))
    except BaseException:
        summary["interrupted"] = True
        raise
    finally:
        bar.close()
        summary["wall_s"] = time.perf_counter() - t0
        if log is not None and todo:
            Path(log).parent.mkdir(parents=True, exist_ok=True)
            append_jsonl(log, {k: v for k, v in summary.items() if k != "runs"})
    return summary


def _one_thread() -> None:
    import torch
    torch.set_num_threads(1)


def map_single_threaded(fn: Callable[[Any], Any], items: Sequence[Any], workers: int = 1,
                        starting: Callable[[int, Any], None] | None = None,
                        finished: Callable[[int, Any], None] | None = None) -> list:
    """[fn(item) for item in items], in order: inline (`starting(i, item)` before each), or, with
    `workers` > 1 and more than one item, in that many spawned single-threaded processes
    (`finished(i, item)` as each completes; fn and the items must pickle). For per-run analyses,
    whose cost is one core each: threads would only contend."""
    if workers > 1 and len(items) > 1:
        from concurrent.futures import ProcessPoolExecutor, as_completed

        out: list = [None] * len(items)
        with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_one_thread) as pool:
            futs = {pool.submit(fn, item): k for k, item in enumerate(items)}
            for i, f in enumerate(as_completed(futs)):
                out[futs[f]] = f.result()
                if finished:
                    finished(i, items[futs[f]])
        return out
    out = []
    for i, item in enumerate(items):
        if starting:
            starting(i, item)
        out.append(fn(item))
    return out


def failure(err: BaseException) -> str:
    """How a failed run is summarised: the one-line message of an error a person fixes (a run another
    process holds names its PID), else the traceback (a bug)."""
    if isinstance(err, UserError):
        return " ".join(str(err).split())
    return "".join(traceback.format_exception(type(err), err, err.__traceback__))


def _timed(run_one: RunOne, spec: RunSpec, position: int, progress: bool) -> dict:
    t0 = time.perf_counter()
    info = run_one(spec, position=position, progress=progress)
    return {"wall_s": time.perf_counter() - t0, **info}


# ----------------------------------------------------------------------------- launchers


def inline(todo: Sequence[RunSpec], run_one: RunOne, workers: int, threads: int, run_bars: bool,
           finished: Callable[[str, bool, Any], None]) -> None:
    """Every run in this process, one after another, with `threads` intra-op threads (`workers` unused)."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for s in todo:
            try:
                info = _timed(run_one, s, 1, run_bars)
            except (KeyboardInterrupt, SystemExit):
                raise
            except Exception as e:  # noqa: BLE001 - report it, go on with the next run
                finished(s.name, False, failure(e))
                continue
            finished(s.name, True, info)
    finally:
        torch.set_num_threads(old)


def _worker_main(slot: int, threads: int, jobs, results, run_one: RunOne, run_bars: bool, parent: int) -> None:
    die_with_parent(parent)  # a launcher killed with -9 leaves no worker training behind
    with graceful_sigterm():  # SIGTERM (the launcher's terminate(), its death) stops at a safe point
        try:
            _work(slot, threads, jobs, results, run_one, run_bars, parent)
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM: stop; nothing half-written is left (the trainer's contract)
            results.cancel_join_thread()  # do not wait to hand a message to a launcher that may be gone
            return


def _work(slot: int, threads: int, jobs, results, run_one: RunOne, run_bars: bool, parent: int) -> None:
    """Take runs from `jobs` until the end marker (None), or until the launcher is gone."""
    import torch

    torch.set_num_threads(threads)
    while True:
        if os.getppid() != parent:  # the launching process is gone: take no new run
            return
        try:
            job = jobs.get(timeout=5.0)
        except queue.Empty:
            continue
        if job is None:
            return
        i, spec = job
        results.put(("start", i, slot, None))
        try:
            results.put(("done", i, slot, _timed(run_one, spec, slot + 1, run_bars)))
        except KeyboardInterrupt:
            raise
        except BaseException as e:  # noqa: BLE001 - report it, go on with the next run
            results.put(("error", i, slot, failure(e)))


def processes(todo: Sequence[RunSpec], run_one: RunOne, workers: int, threads: int, run_bars: bool,
              finished: Callable[[str, bool, Any], None]) -> None:
    """`workers` spawned processes, each with `threads` intra-op threads, pulling runs from a queue.
    A worker killed from outside (out of memory, say) fails its run; Ctrl-C or SIGTERM stops them all."""
    ctx = mp.get_context("spawn")  # no fork after torch has started its thread pools
    jobs, results = ctx.Queue(), ctx.Queue()
    for i, s in enumerate(todo):
        jobs.put((i, s))
    for _ in range(workers):
        jobs.put(None)
    procs = [ctx.Process(target=_worker_main, args=(w, threads, jobs, results, run_one, run_bars, os.getpid()),
                         daemon=True) for w in range(workers)]
    for p in procs:
        p.start()
    current: dict[int, int] = {}
    remaining = len(todo)

    def on_term(signum, frame):  # `kill PID` stops the workers too, as Ctrl-C does
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # one stop: a second SIGTERM must not cut the cleanup
        raise Terminated("stopped by SIGTERM")

    old_term = signal.signal(signal.SIGTERM, on_term) if threading.current_thread() is threading.main_thread() else None
    try:
        while remaining:
            try:
                kind, i, slot, info = results.get(timeout=2.0)
            except queue.Empty:
                for w, p in enumerate(procs):  # a worker killed from outside (e.g. out of memory)
                    if not p.is_alive() and p.exitcode not in (0, None) and w in current:
                        finished(todo[current.pop(w)].name, False, f"worker process exited with code {p.exitcode}")
                        remaining -= 1
                if all(not p.is_alive() for p in procs) and remaining:
                    raise RuntimeError(f"all workers exited with {remaining} run(s) unfinished")
                continue
            if kind == "start":
                current[slot] = i
                continue
            current.pop(slot, None)
            remaining -= 1
            finished(todo[i].name, kind == "done", info)
        for p in procs:
            p.join(timeout=30)
    finally:
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)
        for p in procs:  # only our own worker processes, by handle
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join(timeout=10)
        for q in (jobs, results):
            q.close()
            q.cancel_join_thread()


def ray(todo: Sequence[RunSpec], run_one: RunOne, workers: int, threads: int, run_bars: bool,
        finished: Callable[[str, bool, Any], None], **options: Any) -> None:
    """Each run a Ray task with declared resources, on a local Ray or a cluster (`sqs.runs.ray_launcher`)."""
    from sqs.runs.ray_launcher import launch_ray

    launch_ray(todo, run_one, workers, threads, run_bars, finished, **options)


#: Where runs execute: name -> launcher(todo, run_one, workers, threads, run_bars, finished, **options).
LAUNCHERS: dict[str, Callable[..., None]] = {"inline": inline, "processes": processes, "ray": ray}
