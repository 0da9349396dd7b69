"""The paper's Table 1 and Fig. 3 (Sec. 4.2): the grid of image runs (planning, a process pool).

    specs = plan_grid("runs")                         # 2 datasets x 5 gates x 5 seeds of sec42
    run_grid(specs, workers=2, threads=1)             # skips finished runs, resumes the others
    table1_report.write_report("runs", "results/image")   # from the run directories alone

Run directories: <runs>/<config>/<dataset>/<gate>-s<seed>/ (`sqs.experiments.config.run_dir`),
e.g. runs/sec42/mnist/sqs-s0. <runs>/<config>/grid_log.jsonl gets one line per `run_grid`
call (wall time, parallelism).

Parallelism: `workers` processes (spawned, each with `threads` intra-op threads) pull
runs from a queue. The models are small (0.2 M parameters), too small for intra-op
threads to pay off, and OpenMP threads of one process wait on each other whenever another
job holds a core; so the default is one single-threaded worker per available core.
"""

from __future__ import annotations

import json
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
from typing import Any, Callable, Iterable, Sequence

from sqs.experiments.config import check_no_legacy, config_name, run_dir
from sqs.experiments.image import ImageRunConfig, load_config, run_image
from sqs.experiments.style import DATASET_ORDER, GATES
from sqs.functional import canonical_gate
from sqs.io import ConfigError, atomic_write
from sqs.training.rundir import RunConfigMismatch, canonical_config, has_started
from sqs.training.trainer import is_complete


# ----------------------------------------------------------------------------- grid


@dataclass
class RunSpec:
    dataset: str
    gate: str
    seed: int
    run_dir: Path
    cfg: Any  # ImageRunConfig

    @property
    def name(self) -> str:
        return self.cfg.name()


def plan_grid(runs_dir: str | Path, datasets: Sequence[str] = DATASET_ORDER, gates: Sequence[str] = GATES,
              seeds: int | Sequence[int] = 5, epochs: float | None = None, config: str = "sec42",
              overrides: Iterable[str] = ()) -> list[RunSpec]:
    """The runs of the grid under `runs_dir/<config>/`, ordered seed-major (an interrupted
    grid has every cell with fewer seeds)."""
    seeds = list(range(seeds)) if isinstance(seeds, int) else list(seeds)
    gates = [canonical_gate(g) for g in gates]
    specs = []
    for seed in seeds:
        for ds in datasets:
            for gate in gates:
                ov = list(overrides) + [f"dataset={json.dumps(ds)}", f"model.gate={json.dumps(gate)}", f"seed={seed}"]
                if epochs is not None:
                    ov.append(f"epochs={epochs}")
                try:
                    cfg = load_config(config, ov)
                except ConfigError:
                    raise
                except (ValueError, TypeError) as e:  # the user's config or flags
                    raise ConfigError(str(e)) from e
                specs.append(RunSpec(ds, gate, seed, run_dir(runs_dir, config, ds, gate, seed), cfg))
    return specs


def check_existing(specs: Sequence[RunSpec]) -> None:
    """Refuse to mix runs made with another config into the grid (before anything starts).

    A directory that never trained (no checkpoint, no final weights: a refused start) is not
    a run to protect: the trainer sets its files aside and starts it with the new config."""
    bad = []
    for s in specs:
        check_no_legacy(s.run_dir.parents[2], s.run_dir.parents[1].name, s.dataset, s.gate, s.seed)
        path = s.run_dir / "config.json"
        if path.exists() and has_started(s.run_dir):
            try:
                stored = json.loads(path.read_text())
            except (OSError, ValueError) as e:
                bad.append(f"{s.run_dir} (config.json unreadable: {e})")
                continue
            old = canonical_config({k: v for k, v in stored.items() if k not in ("kind", "resolved")})
            new = canonical_config(s.cfg.to_dict())
            if old != new:
                diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
                bad.append(f"{s.run_dir} (differs in: {', '.join(diff)})")
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise RunConfigMismatch(f"{len(bad)} run director{'y was' if len(bad) == 1 else 'ies were'} made with a "
                                f"different config: {'; '.join(bad[:3])}{more}; choose another --runs-dir "
                                "(or move them away to start over)")


def default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def _worker_main(slot: int, threads: int, jobs, results, cache_dir, run_bars: bool, parent: int) -> None:
    import torch

    torch.set_num_threads(threads)
    while True:
        if os.getppid() != parent:  # the grid process is gone: take no new run
            return
        try:
            job = jobs.get(timeout=5.0)
        except queue.Empty:
            continue
        if job is None:
            return
        name, cfg_dict, run_dir = job
        results.put(("start", name, slot, None))
        t0 = time.perf_counter()
        try:
            cfg = ImageRunConfig.from_dict(cfg_dict)
            recs = run_image(cfg, run_dir, progress=run_bars, cache_dir=cache_dir, desc=name, position=slot + 1)
            final = recs[-1] if recs else {}
            results.put(("done", name, slot, {"wall_s": time.perf_counter() - t0, "test_loss": final.get("test_loss"),
                                              "test_acc": final.get("test_acc")}))
        except KeyboardInterrupt:
            return
        except BaseException:  # noqa: BLE001 - report it, go on with the next run
            results.put(("error", name, slot, traceback.format_exc()))


def _prefetch(datasets: Iterable[str], cache_dir, progress: bool) -> None:
    """Fetch a dataset whose files are not in the cache yet (before any worker starts)."""
    from sqs.data import images

    for ds in sorted(set(datasets)):
        folder = images.dataset_dir(ds, cache_dir)
        if not all(images.find_file(folder, f) for f in images.FILES):
            images.fetch(ds, cache_dir=cache_dir, progress=progress)


def run_grid(specs: Sequence[RunSpec], workers: int = 2, threads: int = 1, cache_dir=None, progress: bool = True,
             run_bars: bool = True, log_dir: str | Path | None = None, desc: str = "table1 runs",
             on_finish: Callable[[str, bool, Any], None] | None = None) -> dict:
    """Train every unfinished run of `specs` (finished ones are skipped, interrupted ones
    resume from their checkpoint); return a summary. Failures are collected, not raised,
    so one bad run does not stop the grid; the summary lists them.

    Other grids reuse this runner: `desc` names the progress bar, and `on_finish(name, ok,
    info)` is called after each run (info: {"wall_s", "test_loss", "test_acc"}, or the
    traceback of a failed run), e.g. to write a progress log."""
    from tqdm.auto import tqdm

    check_existing(specs)
    todo = [s for s in specs if not is_complete(s.run_dir, verify=True)]
    summary = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "n_runs": len(specs), "n_skipped": len(specs) - len(todo),
               "n_trained": 0, "workers": 0, "threads": threads, "failed": [], "runs": {}}
    t0 = time.perf_counter()
    if todo:
        _prefetch((s.dataset for s in todo), cache_dir, progress)
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
            tqdm.write(f"run {name} failed:\n{info}", file=sys.stderr)
        bar.update(1)
        if on_finish is not None:
            on_finish(name, ok, info)

    try:
        if workers == 1:
            _run_inline(todo, threads, cache_dir, run_bars and progress, finished)
        elif workers > 1:
            _run_pool(todo, workers, threads, cache_dir, run_bars and progress, finished)
    except BaseException:
        summary["interrupted"] = True
        raise
    finally:
        bar.close()
        summary["wall_s"] = time.perf_counter() - t0
        if log_dir is not None and todo:
            _append_log(Path(log_dir) / "grid_log.jsonl", {k: v for k, v in summary.items() if k != "runs"})
    return summary


def _run_inline(todo, threads, cache_dir, run_bars, finished) -> None:
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for s in todo:
            t0 = time.perf_counter()
            try:
                recs = run_image(s.cfg, s.run_dir, progress=run_bars, cache_dir=cache_dir, desc=s.name, position=1)
            except (KeyboardInterrupt, SystemExit):
                raise
            except Exception:  # noqa: BLE001
                finished(s.name, False, traceback.format_exc())
                continue
            final = recs[-1] if recs else {}
            finished(s.name, True, {"wall_s": time.perf_counter() - t0, "test_loss": final.get("test_loss"),
                                    "test_acc": final.get("test_acc")})
    finally:
        torch.set_num_threads(old)


def _run_pool(todo, workers, threads, cache_dir, run_bars, finished) -> None:
    ctx = mp.get_context("spawn")  # no fork after torch has started its thread pools
    jobs, results = ctx.Queue(), ctx.Queue()
    for s in todo:
        jobs.put((s.name, s.cfg.to_dict(), str(s.run_dir)))
    for _ in range(workers):
        jobs.put(None)
    procs = [ctx.Process(target=_worker_main, args=(i, threads, jobs, results, cache_dir, run_bars, os.getpid()),
                         daemon=True) for i in range(workers)]
    for p in procs:
        p.start()
    current: dict[int, str] = {}
    remaining = len(todo)

    def on_term(signum, frame):  # `kill PID` stops the workers too, as Ctrl-C does
        raise KeyboardInterrupt

    old_term = signal.signal(signal.SIGTERM, on_term) if threading.current_thread() is threading.main_thread() else None
    try:
        while remaining:
            try:
                kind, name, slot, info = results.get(timeout=2.0)
            except queue.Empty:
                for i, p in enumerate(procs):  # a worker killed from outside (e.g. out of memory)
                    if not p.is_alive() and p.exitcode not in (0, None) and i in current:
                        finished(current.pop(i), False, f"worker process exited with code {p.exitcode}")
                        remaining -= 1
                if all(not p.is_alive() for p in procs) and remaining:
                    raise RuntimeError(f"all workers exited with {remaining} run(s) unfinished")
                continue
            if kind == "start":
                current[slot] = name
                continue
            current.pop(slot, None)
            remaining -= 1
            finished(name, kind == "done", info)
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


def _append_log(path: Path, rec: dict) -> None:
    old = path.read_text() if path.exists() else ""
    atomic_write(path, lambda p: p.write_text(old + json.dumps(rec) + "\n"))




def grid_dir(runs_dir: str | Path, config: str = "sec42") -> Path:
    """The folder of one config's grid: `runs_dir/<config name>` (holds grid_log.jsonl)."""
    return Path(runs_dir) / config_name(config)
