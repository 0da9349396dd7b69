"""Stopping cleanly: SIGTERM is a stop like Ctrl-C, no signal lands inside a file operation, and a
worker process dies with its parent.

SLURM, Kubernetes and `kill PID` send SIGTERM. By default it ends Python at once, wherever it is,
leaving the temporary file of a save behind and printing nothing. Inside `graceful_sigterm()` it
raises `Terminated` instead: a `KeyboardInterrupt`, so every cleanup written for Ctrl-C runs for
it too; the CLI prints one line and exits with 143 (128 + SIGTERM), as a shell reports it.

`deferred_signals()` holds SIGINT and SIGTERM back for the length of a block (a checkpoint save or
read) and delivers them when it ends. An interrupt raised inside safetensors or torch can come out
as another exception (torch's tensor conversion turns it into a ValueError about an
UntypedStorage), which must not be taken for a damaged file: held back, it cannot land there, the
save completes, and the run stops right after.

`die_with_parent(pid)` makes a worker stop (SIGTERM, so gracefully) within a second or so of its
parent's death, even a `kill -9` of the parent: PR_SET_PDEATHSIG where Linux has it, and a thread
that watches `os.getppid()` everywhere.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from typing import Iterator

#: Exit status of a process stopped by SIGTERM (128 + 15), as a shell reports it.
SIGTERM_STATUS = 128 + signal.SIGTERM


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised as an interruption (a KeyboardInterrupt: Ctrl-C's cleanups run for it too)."""

    exit_status = SIGTERM_STATUS


def _main_thread() -> bool:
    """Python runs signal handlers in the main thread only, and only it may install them."""
    return threading.current_thread() is threading.main_thread()


def _raise_terminated(signum, frame) -> None:
    # One stop is enough: a second SIGTERM (the parent-death signal after a `kill`, say) must not
    # interrupt the cleanup the first one started. graceful_sigterm() restores the default after.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise Terminated("stopped by SIGTERM")


@contextlib.contextmanager
def graceful_sigterm() -> Iterator[None]:
    """Within the block SIGTERM raises `Terminated`. A handler the program installed itself is
    kept (its owner decides), and outside the main thread nothing changes."""
    if not _main_thread() or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return
    signal.signal(signal.SIGTERM, _raise_terminated)  # (SIG_IGN, or another program's handler: kept)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


_deferring = False


@contextlib.contextmanager
def deferred_signals() -> Iterator[None]:
    """Hold SIGINT and SIGTERM back until the block ends, then deliver them to the handlers that
    were in place (Ctrl-C raises KeyboardInterrupt, SIGTERM `Terminated` or its default action).

    Nested blocks hold until the outermost ends. Outside the main thread (where no handler runs)
    it does nothing."""
    global _deferring
    if _deferring or not _main_thread():
        yield
        return
    pending: list[int] = []

    def hold(signum, frame) -> None:
        pending.append(signum)

    old = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        handler = signal.getsignal(sig)
        if handler is None or handler is signal.SIG_IGN:
            continue  # installed outside Python (cannot be restored) or ignored: leave it alone
        old[sig] = signal.signal(sig, hold)
    _deferring = True
    try:
        yield
    finally:
        _deferring = False
        for sig, handler in old.items():
            signal.signal(sig, handler)
        for sig in dict.fromkeys(pending):
            _deliver(sig, old[sig])


def _deliver(sig: int, handler) -> None:
    if callable(handler):
        handler(sig, None)
    elif handler is signal.SIG_DFL:
        signal.raise_signal(sig)


# ----------------------------------------------------------------------------- worker processes

PR_SET_PDEATHSIG = 1


def _set_parent_death_signal(sig: int) -> bool:
    """Ask Linux to send `sig` to this process when its parent dies (prctl); False where it cannot."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def die_with_parent(parent: int, interval: float = 0.5) -> None:
    """Stop this process with SIGTERM (a graceful stop where `graceful_sigterm` is active) as soon
    as `parent` is no longer its parent: at once through PR_SET_PDEATHSIG on Linux, elsewhere
    within `interval` seconds through a thread that watches os.getppid() (a parent killed with -9
    runs no cleanup of its own, so the worker must notice by itself)."""
    if _set_parent_death_signal(signal.SIGTERM):
        if os.getppid() != parent:  # it died before prctl took effect
            os.kill(os.getpid(), signal.SIGTERM)
        return

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(interval)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="sqs-parent-watchdog", daemon=True).start()
