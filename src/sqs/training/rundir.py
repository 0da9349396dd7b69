"""The run directory: one writer, a config that is checked, a history that is never lost.

Every file a run directory may hold is registered here (`RUN_FILES`, with who writes it and
when; docs/reliability.md lists the same table), and everything written into it after the
start goes through this module under the run lock (`write_run_file`, `update_run_json`,
`locked`):

    config.json              the run's identity (written when training starts)
    metrics.jsonl            one record per evaluation, appended
    history.jsonl            events: starts, allowed config changes, divergence, repairs
    checkpoint.safetensors   newest checkpoint; checkpoint.prev.safetensors the one before
    model.safetensors        final weights (finished runs)
    run.lock                 held (fcntl.flock) by the one process training the run
    timing.json              wall time of the processes that trained an image run
    tokenizer.json           the tokenizer a language-model run was trained with
    frontier_analysis.json   the frontier's cached analysis of a finished run
    spectra/                 `sqs spectra ...` outputs written next to the run (the default --out)
    tensorboard/             TensorBoard event files (`--logger tensorboard`, sqs.training.loggers)
    wandb.json, wandb/       the run's W&B run id; W&B's own files unless WANDB_DIR is set (`--logger wandb`)
    sqs-run.json             the mark of a directory sqs made (written when training first claims it)

A run directory holds only what the project wrote. Training claims a directory (`claimed`)
before it writes anything there: a new or empty folder is marked as ours (sqs-run.json); a
folder that holds anything sqs did not write is refused in one line, and nothing in it is
renamed, moved or deleted. A folder made by an older sqs (no mark) is recognised by its content
(`ownership`) and marked. Every OS error on a run's files inside `claimed` (read-only, no space,
permission, quota, a name that cannot be encoded) is one `RunFileError` line: the path, the
cause and the fix as CLI flags.

Nothing here is deleted: a file that has to leave its place (a damaged checkpoint, a
metrics file with a damaged line, the files of a start that never trained) is kept aside
under a new name, `<name>.<why>-<n>`, and the move is written to history.jsonl. A divergence
is the `diverged` event of history.jsonl (`active_divergence`), not a file of its own. (The
temporary files of writes that a kill -9 cut short, `.<name>.*.tmp`, are removed when the run is
next claimed: they never held a finished file.)
"""

from __future__ import annotations

import contextvars
import errno
import json
import os
import shutil
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from sqs.core import canonical_gate
from sqs.io import (
    DataWarning,
    UserError,
    append_jsonl,
    atomic_write,
    naming_errors,
    os_cause,
    read_jsonl,
    scan_jsonl,
    write_json,
)
from sqs.training.checkpoint import (
    HASH_KEY,
    CheckpointCorrupt,
    CheckpointError,
    header_metadata,
    read_meta,
    verify_checkpoint,
)
from sqs.training.signals import deferred_signals

CONFIG = "config.json"
METRICS = "metrics.jsonl"
HISTORY = "history.jsonl"
CHECKPOINT = "checkpoint.safetensors"
PREVIOUS = "checkpoint.prev.safetensors"
MODEL = "model.safetensors"
LOCK = "run.lock"
TIMING = "timing.json"
TOKENIZER = "tokenizer.json"
TOKENIZER_SHA256 = "tokenizer.json.sha256"
MARKER = "sqs-run.json"
FRONTIER_ANALYSIS = "frontier_analysis.json"
GATES_ANALYSIS = "gates_analysis.json"
SPECTRA = "spectra"
TENSORBOARD = "tensorboard"
WANDB_RUN = "wandb.json"
WANDB_FILES = "wandb"

#: Every name a run directory may hold, and who writes it. Besides these only set-aside copies
#: (`<name>.<why>-<n>`) and the temporary files of an atomic write in progress (`.<name>.*.tmp`)
#: appear (`unregistered_files` lists anything else).
RUN_FILES = {
    CONFIG: "the run's identity; written when training starts, compared on every resume (prepare_run_dir)",
    METRICS: "one record per evaluation, appended and fsynced (the trainer)",
    HISTORY: "one line per event: starts, allowed config changes, divergence, files set aside (record_event)",
    CHECKPOINT: "model, optimizer state and step at every checkpoint step, sha256 in its header (the trainer)",
    PREVIOUS: "the checkpoint before the newest one (the trainer)",
    MODEL: "final weights of a finished run (the trainer)",
    LOCK: "held by the one process that trains the run (RunLock)",
    TIMING: "wall time of the processes that trained an image run (sqs.runs.image_pipeline.run_image)",
    TOKENIZER: "the tokenizer a language-model run trains with, copied from the cache at its start and checked "
               "against its sha256 on every start and load (sqs.runs.lm_pipeline.run_lm)",
    TOKENIZER_SHA256: "the sha256 of tokenizer.json, written with it (sqs.data.tinystories.ensure_tokenizer_copy)",
    MARKER: "the mark of a directory sqs made, written when training first claims it (claimed)",
    FRONTIER_ANALYSIS: "the frontier's analysis of a finished run, cached (sqs.experiments.frontier_analysis)",
    GATES_ANALYSIS: "the gate benchmark's analysis of a finished run, cached (sqs.experiments.gates_analysis)",
    SPECTRA: "folder: `sqs spectra decompose|explain|lm` outputs when --out is not given",
    TENSORBOARD: "folder: TensorBoard event files, one per training session (--logger tensorboard)",
    WANDB_RUN: "the W&B run id and the last step sent, so a resume continues the same W&B run (--logger wandb)",
    WANDB_FILES: "folder: W&B's own files of the run when WANDB_DIR is not set (wandb.init(dir=run_dir))",
}

# Settings that may differ on resume when the caller opts in (after a NaN, typically): they
# change how the remaining steps are taken, not what the run is (model, data, schedule length).
ALLOWED_CHANGES = ("lr", "min_lr", "grad_clip")


class RunDirError(UserError):
    """A run directory that cannot be used as asked (another config, another writer, ...)."""


class NotARunDir(RunDirError, FileNotFoundError):
    """A path given as a run directory that has no run in it (no config.json, or no weights yet)."""


class RunLocked(RunDirError):
    """Another live process is training into the same run directory."""

    def __init__(self, message: str, pid: int | None):
        super().__init__(message)
        self.pid = pid


class RunConfigMismatch(RunDirError, ValueError):
    """The run directory was made with another config (and has trained)."""


class NotOurs(RunDirError):
    """A folder given as a run directory that holds files sqs did not write: it is left untouched."""


class RunFileError(RunDirError, OSError):
    """An OS error on a run's files (read-only file system, no space, permission, quota, a name that
    cannot be encoded): one line with the path, the cause and the fix. `errno` and `filename` are
    those of the OSError."""

    def __init__(self, message: str, err: int | None = None, filename: str | None = None):
        super().__init__(message)
        self.errno, self.filename = err, filename

    def __str__(self) -> str:
        return str(self.args[0])


def run_file(run_dir: str | Path, name: str) -> Path:
    """The path of the registered file `name` of a run directory (ValueError for an unregistered name:
    a new kind of file is added to `RUN_FILES`, and to docs/reliability.md, first)."""
    if name not in RUN_FILES:
        raise ValueError(f"{name!r} is not a file a run directory holds; register it in "
                         "sqs.training.rundir.RUN_FILES (and docs/reliability.md) first")
    return Path(run_dir) / name


def unregistered_files(run_dir: str | Path) -> list[str]:
    """Names in `run_dir` that no part of the project writes there: neither registered, nor a
    set-aside copy `<name>.<why>-<n>`, nor the temporary of a write in progress (`.<name>.<...>`).
    NFS's own placeholders of deleted files that are still open (`.nfs...`) are not counted."""
    out = []
    for p in sorted(Path(run_dir).iterdir()):
        name = p.name
        if name.startswith("."):
            ok = _is_temporary(name) or name.startswith(".nfs")
        else:
            ok = any(name == r or (name.startswith(r + ".") and _is_aside(name[len(r) + 1:])) for r in RUN_FILES)
        if not ok:
            out.append(p.name)
    return out


def _is_temporary(name: str) -> bool:
    """`.<registered name>.<...>`: the temporary file of a write (atomic_write, a link, a copy aside)."""
    return name.startswith(".") and any(name[1:].startswith(r + ".") for r in RUN_FILES)


def _is_aside(suffix: str) -> bool:
    """`<why>-<n>` (the tail `aside_path` adds), possibly repeated."""
    return all(part.rpartition("-")[2].isdigit() and part.rpartition("-")[0] for part in suffix.split("."))


# ----------------------------------------------------------------------------- whose directory


def check_run_dir_name(run_dir: str | os.PathLike) -> Path:
    """`run_dir` as a Path, refused (RunDirError, one line) when it is empty (which would mean the
    current folder) or not valid UTF-8 (safetensors cannot open such paths)."""
    text = os.fspath(run_dir)
    if isinstance(text, bytes):
        text = os.fsdecode(text)
    if not text.strip():
        raise RunDirError("the run directory is an empty path; name a folder with --run-dir DIR "
                          "(Python: run_dir=...)")
    try:
        os.fsencode(text).decode("utf-8")
    except UnicodeDecodeError:
        shown = os.fsencode(text).decode("utf-8", "backslashreplace")
        raise RunFileError(f"{shown}: the name is not valid UTF-8 (name not encodable), and the safetensors "
                           "files of a run need one; rename the folder or choose a --run-dir whose name is "
                           "valid UTF-8", errno.EILSEQ, text) from None
    return Path(text)


#: Keys every config.json of a run kind holds (how a run made before the mark is recognised).
_CONFIG_KEYS = {"image": {"kind", "dataset", "seed", "model", "train", "resolved"},
                "lm": {"kind", "lm", "model", "plan", "data"}}


def _sqs_evidence(run_dir: Path) -> str | None:
    """What shows that an unmarked folder holding only registered names was written by sqs: a
    config.json of a run kind, a checkpoint whose header sqs wrote, or a history of sqs events.
    None if nothing does (a user's config.json, say, is not enough)."""
    try:
        config = json.loads((run_dir / CONFIG).read_text(encoding="utf-8"))
        if isinstance(config, dict) and _CONFIG_KEYS.get(config.get("kind"), {None}) <= set(config):
            return f"its {CONFIG} is an sqs {config['kind']} run's"
    except (OSError, ValueError):
        pass
    for name in (CHECKPOINT, PREVIOUS, MODEL):
        if not (run_dir / name).is_file():
            continue
        try:
            meta = header_metadata(run_dir / name)
            if HASH_KEY in meta or isinstance(json.loads(meta.get("meta", "null")), dict):
                return f"its {name} was written by sqs"
        except (CheckpointError, OSError, ValueError):
            continue  # not readable as a file sqs wrote: no evidence (nothing follows from it)
    records = scan_jsonl(run_dir / HISTORY).records if (run_dir / HISTORY).is_file() else []
    if records and all(isinstance(r.get("event"), str) and "time" in r and "pid" in r for r in records):
        return f"its {HISTORY} is an sqs run's"
    return None


def ownership(run_dir: str | Path) -> str:
    """Whose folder `run_dir` is, read-only: "new" (absent or empty: sqs may make it a run),
    "marked" (sqs made it: it holds sqs-run.json), "older" (made by an sqs from before the mark,
    recognised by its content; claiming marks it). Anything else raises NotOurs (one line, the
    files named): a folder that holds a file sqs did not write, or whose registered names sqs cannot
    show it wrote."""
    run_dir = Path(run_dir)
    if not run_dir.exists():
        return "new"
    if not run_dir.is_dir():
        raise NotOurs(f"{run_dir} is a file, not a folder; choose another --run-dir (nothing was changed)")
    names = sorted(p.name for p in run_dir.iterdir() if p.name != LOCK and not p.name.startswith("."))
    foreign = unregistered_files(run_dir)
    if (run_dir / MARKER).is_file():
        how = "marked"
    elif not names and not foreign:
        return "new"  # empty, or what a start that died at once left: its lock (and temporary files)
    elif _sqs_evidence(run_dir) is not None:
        how = "older"
    else:
        how, foreign = "", sorted(set(names) | set(foreign))  # nothing shows that sqs wrote any of it
    if foreign:
        more = f" and {len(foreign) - 5} more" if len(foreign) > 5 else ""
        raise NotOurs(f"{run_dir} holds files sqs did not write ({', '.join(foreign[:5])}{more}); sqs trains only in "
                      "a new or empty folder or in a run directory it made, and never moves a file of yours: "
                      "choose another --run-dir (or move those files out); nothing was changed")
    return how


def _mark(run_dir: Path, how: str) -> None:
    """Write sqs-run.json (atomically): this folder is a run directory sqs made."""
    write_json(run_dir / MARKER, {"sqs_run": 1, "marked": time.strftime("%Y-%m-%d %H:%M:%S"), "how": how})
    if how == "older":
        record_event(run_dir, "marked", why=f"made by an older sqs: {_sqs_evidence(run_dir)}")


def remove_temporaries(run_dir: str | Path) -> list[str]:
    """Remove the temporary files of writes that were cut short (`.<name>.*.tmp`, `.<name>.link`, left
    by a kill -9 or a power loss): they never held a finished file. Call only under the run lock,
    which every writer holds, so no write in progress is touched. Returns the names removed."""
    gone = []
    for p in Path(run_dir).iterdir():
        if _is_temporary(p.name) and p.is_file():
            p.unlink(missing_ok=True)
            gone.append(p.name)
    return gone


def check_claimable(run_dir: str | os.PathLike) -> Path:
    """`run_dir` as a Path once it is known that training may claim it (a usable name, a folder that
    is new or ours: `check_run_dir_name`, `ownership`); read-only, so pipelines call it before any
    slow work (loading data), and a refusal costs nothing."""
    run_dir = check_run_dir_name(run_dir)
    ownership(run_dir)
    return run_dir


@contextmanager
def claimed(run_dir: str | os.PathLike) -> Iterator[Path]:
    """Hold `run_dir` for training: refuse it (before writing anything there) when it is not ours
    (`ownership`), else take the run lock, mark it, remove the temporaries of cut-short writes,
    and turn OS errors on its files into one-line RunFileErrors. Re-entrant, like the lock."""
    run_dir = check_claimable(run_dir)
    with run_file_errors(run_dir), RunLock(run_dir):
        how = ownership(run_dir)  # again, under the lock
        if how != "marked":
            _mark(run_dir, how)
        remove_temporaries(run_dir)
        yield run_dir


# ----------------------------------------------------------------------------- OS errors


def _inside(path: str | bytes | None, run_dir: Path) -> bool:
    if path is None:
        return False
    p = os.path.abspath(os.fsdecode(path))
    root = os.path.abspath(os.fspath(run_dir))
    return p == root or p.startswith(root.rstrip(os.sep) + os.sep)


def os_error_fix(err: int | None, run_dir: Path) -> str:
    """The fix, in CLI terms (and the Python form), for an OS error `err` on the files of `run_dir`."""
    other = "choose another folder with --run-dir DIR (Python: run_dir=...)"
    if err in (errno.ENOSPC, errno.EDQUOT):
        room = "free space on that file system" if err == errno.ENOSPC else "free space within your disk quota"
        return (f"{room}, then re-run the same command: the run resumes from its last checkpoint (what was "
                "written is intact), or " + other)
    if err == errno.EROFS:
        return "choose a folder on a writable file system with --run-dir DIR (Python: run_dir=...)"
    if err in (errno.EACCES, errno.EPERM):
        return f"give yourself read and write access to {run_dir} (chmod/chown), or {other}"
    if err == errno.EILSEQ:
        return "rename the folder or choose a --run-dir whose name is valid UTF-8"
    if err == errno.ENAMETOOLONG:
        return f"the name is too long; {other}"
    return f"check that file system, or {other}"


@contextmanager
def run_file_errors(run_dir: str | Path) -> Iterator[None]:
    """Inside the block, an OSError (or a path that cannot be encoded) on a file of `run_dir`
    becomes RunFileError: one line with the path, the cause and the fix. Other errors pass."""
    run_dir = Path(run_dir)
    try:
        yield
    except UserError:
        raise
    except OSError as e:
        where = next((f for f in (e.filename, e.filename2) if _inside(f, run_dir)), None)
        if where is None:
            raise
        where = os.fsdecode(where)
        raise RunFileError(f"{os.fsencode(where).decode('utf-8', 'backslashreplace')}: {os_cause(e)}; "
                           f"{os_error_fix(e.errno, run_dir)}", e.errno, where) from e
    except UnicodeEncodeError as e:
        shown = os.fsencode(os.fspath(run_dir)).decode("utf-8", "backslashreplace")
        raise RunFileError(f"{shown}: a path in it cannot be encoded (name not encodable: {e.reason}); "
                           f"{os_error_fix(errno.EILSEQ, run_dir)}", errno.EILSEQ, os.fspath(run_dir)) from e


@contextmanager
def locked(run_dir: str | Path) -> Iterator[Path]:
    """Hold the run's lock (RunLock) while writing into its directory; yields the directory."""
    with RunLock(run_dir):
        yield Path(run_dir)


def write_run_file(run_dir: str | Path, name: str, write: Callable[[Path], None]) -> Path:
    """Write the registered file `name` atomically (`write(tmp_path)`, then rename) under the run lock."""
    path = run_file(run_dir, name)
    with RunLock(run_dir):
        return atomic_write(path, write)


def write_run_json(run_dir: str | Path, name: str, obj: Any) -> Path:
    """Write the registered JSON file `name` (as `sqs.io.write_json` does) under the run lock."""
    path = run_file(run_dir, name)
    with RunLock(run_dir):
        return write_json(path, obj)


def update_run_json(run_dir: str | Path, name: str, update: Callable[[dict], dict]) -> Path:
    """Read the registered JSON file `name` ({} if absent or unreadable), write `update(old)` back,
    all under the run lock (so two processes never lose each other's update)."""
    path = run_file(run_dir, name)
    with RunLock(run_dir):
        try:
            old = json.loads(path.read_text()) if path.exists() else {}
        except (OSError, ValueError):
            old = {}
        return write_json(path, update(old if isinstance(old, dict) else {}))


# ----------------------------------------------------------------------------- state of a run


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The evaluation records of a run; damaged lines are skipped with a warning naming
    their line numbers (the records after them are kept)."""
    return read_jsonl(Path(run_dir) / METRICS)


def is_complete(run_dir: str | Path, verify: bool = False) -> bool:
    """True for a finished run: a final metrics record and final weights. With `verify` the
    weights must also match their sha256: experiment loops pass it, so they re-run (and
    `train` repairs) a finished run whose model.safetensors is damaged instead of skipping it;
    reports, which read only the metrics, need not."""
    run_dir = Path(run_dir)
    if not (run_dir / MODEL).exists() or not any(m.get("final") for m in read_metrics(run_dir)):
        return False
    if verify:
        try:
            verify_checkpoint(run_dir / MODEL)
        except CheckpointCorrupt:
            return False
    return True


def change_hint(keys: Iterable[str]) -> str:
    """How a user allows a deliberate change of `keys` on resume (CLI and Python)."""
    keys = list(keys)
    cli = " ".join(f"--allow-change {k}" for k in keys)
    return f"{cli} (Python: allow_changes={tuple(keys)!r})"


# ----------------------------------------------------------------------------- history


def record_event(run_dir: str | Path, event: str, **fields: Any) -> dict:
    """Append one event to the run's history.jsonl (with wall time and pid)."""
    rec = {"event": event, **fields, "time": time.strftime("%Y-%m-%d %H:%M:%S"), "pid": os.getpid()}
    append_jsonl(Path(run_dir) / HISTORY, rec)
    return rec


def read_history(run_dir: str | Path) -> list[dict]:
    """The run's events, oldest first (empty for runs made before history.jsonl existed)."""
    return read_jsonl(Path(run_dir) / HISTORY)


def aside_path(path: Path, why: str) -> Path:
    n = 1
    while True:
        cand = path.with_name(f"{path.name}.{why}-{n}")
        if not cand.exists():
            return cand
        n += 1


def move_aside(path: Path, why: str) -> Path:
    """Rename `path` to `<name>.<why>-<n>` (first free n); return the new path."""
    dest = aside_path(path, why)
    os.replace(path, dest)
    return dest


def copy_aside(path: Path, why: str) -> Path:
    """Copy `path` to `<name>.<why>-<n>` (atomically: a crash leaves no partial copy)."""
    dest = aside_path(path, why)
    tmp = dest.with_name(f".{dest.name}.tmp")
    try:
        with naming_errors(dest, tmp):
            shutil.copy2(path, tmp)
            os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return dest


def last_divergence(run_dir: str | Path) -> dict | None:
    """The last recorded `diverged` event (step, what, checkpoint_step, resume_step) that no later
    start has dealt with, else None: how experiments tell a diverged run from an unfinished one."""
    found = None
    for ev in read_history(run_dir):
        if ev.get("event") == "diverged":
            found = ev
        elif ev.get("event") == "start":
            found = None
    return found


def active_divergence(run_dir: str | Path) -> int | None:
    """Step of the last recorded divergence that no later start has dealt with, else None."""
    ev = last_divergence(run_dir)
    return None if ev is None else ev.get("step")


# ----------------------------------------------------------------------------- lock


class RunLock:
    """An OS lock (fcntl.flock) on `run_dir/run.lock`, re-entrant within a process.

    The OS releases it when the holder exits, however it exits (kill -9 included), so a
    lock file left behind never blocks a later start; the PID written in it is only used
    to name the holder when the lock is really held. Where fcntl does not exist
    (Windows) it warns and does not lock.
    """

    _held: dict[str, list] = {}

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK

    def acquire(self) -> "RunLock":
        self.run_dir.mkdir(parents=True, exist_ok=True)
        key = str(self.path.resolve())
        held = self._held.get(key)
        if held is not None and held[2] == os.getpid():
            held[1] += 1
            return self
        try:
            import fcntl
        except ImportError:
            warnings.warn(f"no fcntl on this system: {self.run_dir} is not locked; do not start two "
                          "processes on it", RuntimeWarning, stacklevel=2)
            self._held[key] = [None, 1, os.getpid()]
            return self
        with deferred_signals():  # a Ctrl-C here must not leave the lock taken by an open file nobody holds
            f = open(self.path, "a+", encoding="utf-8")
            try:
                try:
                    fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    f.seek(0)
                    text = f.read().strip()
                    pid = int(text) if text.isdigit() else None
                    who = f"process {pid}" if pid is not None else "another process"
                    raise RunLocked(f"run directory {self.run_dir} is in use: {who} is training it (it holds "
                                    f"{self.path}); wait for it to finish or stop it, or use another run directory",
                                    pid) from None
                with naming_errors(self.path):
                    f.seek(0)
                    f.truncate()
                    f.write(f"{os.getpid()}\n")
                    f.flush()
            except BaseException:
                f.close()  # closing releases the lock
                raise
            self._held[key] = [f, 1, os.getpid()]
        return self

    def release(self) -> None:
        key = str(self.path.resolve())
        held = self._held.get(key)
        if held is None or held[2] != os.getpid():
            return
        held[1] -= 1
        if held[1] > 0:
            return
        del self._held[key]
        f = held[0]
        if f is not None:
            import fcntl

            with deferred_signals():
                try:
                    f.seek(0)
                    f.truncate()  # the PID is only for naming a live holder
                except OSError:
                    pass
                finally:
                    fcntl.flock(f.fileno(), fcntl.LOCK_UN)
                    f.close()

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


# ----------------------------------------------------------------------------- config


_ALLOWED: contextvars.ContextVar[frozenset[str]] = contextvars.ContextVar("sqs_allowed_changes", default=frozenset())


def _check_allowed(keys: Iterable[str]) -> frozenset[str]:
    keys = frozenset(keys)
    bad = sorted(keys - set(ALLOWED_CHANGES))
    if bad:
        raise RunDirError(f"cannot allow a change of {', '.join(bad)} on resume; only "
                          f"{', '.join(ALLOWED_CHANGES)} may change (other keys define the run: "
                          "use another run directory)")
    return keys


@contextmanager
def allow_changes(*keys: str) -> Iterator[None]:
    """Within this block, resuming a run may change the settings `keys` (from ALLOWED_CHANGES).

    For code that calls the trainer through an experiment function, e.g.
    `with allow_changes("lr"): run_lm(cfg.replace(lr=1e-4), run_dir)`. Each change is
    recorded in history.jsonl (step, key, old, new)."""
    token = _ALLOWED.set(_ALLOWED.get() | _check_allowed(keys))
    try:
        yield
    finally:
        _ALLOWED.reset(token)


def has_started(run_dir: str | Path) -> bool:
    """True once training has left something to protect: a checkpoint or final weights.

    A directory with only config.json (and maybe metrics of step 0 or a tokenizer) is a
    start that was refused or died before its first checkpoint."""
    run_dir = Path(run_dir)
    return any((run_dir / n).exists() for n in (CHECKPOINT, PREVIOUS, MODEL))


def _leaves(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_leaves(v, f"{prefix}{k}."))
        return out or {prefix[:-1]: {}}
    return {prefix[:-1]: obj}


def canonical_config(obj: Any) -> Any:
    """A config with every `gate` value under its paper name (`identity` -> `bilinear`,
    `silu` -> `swiglu`): runs made before the renaming compare equal to today's."""
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            if k == "gate" and isinstance(v, str):
                try:
                    v = canonical_gate(v)
                except ValueError:
                    pass
            out[k] = canonical_config(v)
        return out
    if isinstance(obj, list):
        return [canonical_config(v) for v in obj]
    return obj


def config_diff(old: dict, new: dict) -> list[tuple[str, Any, Any]]:
    """(dotted key, old, new) for every leaf that differs."""
    a, b = _leaves(old), _leaves(new)
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def planned_resume_step(run_dir: str | Path) -> int:
    """The step a resume of `run_dir` would start from (read from checkpoint headers only)."""
    run_dir = Path(run_dir)
    limit = active_divergence(run_dir)
    steps = []
    for name in (CHECKPOINT, PREVIOUS):
        if not (run_dir / name).exists():
            continue
        try:
            steps.append(int(read_meta(run_dir / name)["step"]))
        except (CheckpointError, KeyError, TypeError, ValueError):
            continue  # not a usable checkpoint: the resume will not start from it
    ok = [s for s in steps if limit is None or s < limit]
    return max(ok, default=0)


def prepare_run_dir(run_dir: str | Path, config: dict, allow_changes: Iterable[str] = ()) -> Path:
    """Create the run directory, or check that an existing one was made with `config`.

    - A folder that is not ours (files sqs did not write): NotOurs, and nothing is changed (`claimed`).
    - No config.json: it is written.
    - Same config: nothing to do.
    - Another config, but the directory never trained (no checkpoint, no final weights; a
      refused start): its files (only sqs's: the folder is ours) are kept as
      `<name>.not-started-<n>` and `config` is used.
    - Another config in a run that trained: RunConfigMismatch, unless every differing
      key is allowed (argument `allow_changes` or the `allow_changes(...)` context, keys from
      ALLOWED_CHANGES); then config.json is updated and each change recorded in history.jsonl.

    Claims the directory (`claimed`: the run lock, the mark) while it works, so it refuses a
    directory another process trains.
    """
    new = json.loads(json.dumps(config))
    allowed = _check_allowed(allow_changes) | _ALLOWED.get()
    with claimed(run_dir) as run_dir:
        path = run_dir / CONFIG
        if not path.exists():
            write_json(path, new)
            return run_dir
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as e:  # not JSON (an OSError is not damage: it stays one, a RunFileError line)
            if has_started(run_dir):
                raise RunDirError(f"{path} is damaged ({e}); restore it from a copy, or use another run "
                                  "directory") from e
            old = None
        if old is not None:
            old = canonical_config(old)
        if old == canonical_config(new):
            return run_dir
        if not has_started(run_dir):
            _set_aside_unstarted(run_dir)
            write_json(path, new)
            return run_dir
        diffs = config_diff(old, canonical_config(new))
        refused = [d for d in diffs if d[0].rsplit(".", 1)[-1] not in allowed]
        if refused:
            keys = [d[0] for d in refused]
            msg = (f"run directory {run_dir} was made with a different config (differs in: {', '.join(keys)}); "
                   "choose another run directory or delete this one to start over")
            leaf = sorted({k.rsplit(".", 1)[-1] for k in keys})
            if all(k in ALLOWED_CHANGES for k in leaf):
                msg += f", or allow the change on resume with {change_hint(leaf)}"
            raise RunConfigMismatch(msg)
        step = planned_resume_step(run_dir)
        write_json(path, new)
        for key, a, b in diffs:
            record_event(run_dir, "config_change", step=step, key=key, old=a, new=b)
            warnings.warn(f"{run_dir}: {key} changed from {a!r} to {b!r} on resume at step {step} (allowed; "
                          f"recorded in {HISTORY})", DataWarning, stacklevel=2)
    return run_dir


def _set_aside_unstarted(run_dir: Path) -> list[Path]:
    """Keep the files of a start that never trained as `<name>.not-started-<n>` (renamed in
    place, so nothing looks for them as a run: no second config.json appears). Only in a folder
    sqs marked, and only the files it registers: never a file of the user's."""
    if not (run_dir / MARKER).is_file():
        raise NotOurs(f"{run_dir} is not marked as a run directory sqs made ({MARKER}); nothing was changed")
    moved = []
    for p in sorted(run_dir.iterdir()):
        if p.name in (LOCK, HISTORY, MARKER) or p.name not in RUN_FILES or not p.is_file():
            continue
        moved.append(move_aside(p, "not-started"))
    record_event(run_dir, "not_started_set_aside", files=[m.name for m in moved])
    warnings.warn(f"{run_dir} held a start that never trained (no checkpoint) with another config; its files are "
                  f"kept as {', '.join(m.name for m in moved)} and the new config is used", DataWarning, stacklevel=3)
    return moved
