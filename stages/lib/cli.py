"""What every stage's `main` shares: logging set-up, the one-line error for bad input, and dying
with the process that started it."""

from __future__ import annotations

import ctypes
import gc
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Callable

PR_SET_PDEATHSIG = 1
WATCH_SECONDS = 0.5


class UserError(Exception):
    """Bad input the user can fix: printed as one line, no traceback, exit status 1."""


def stat_fields(pid: int) -> list[str] | None:
    """/proc/PID/stat's fields after the command name (state, ppid, ...); None once it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def started_at(pid: int) -> str | None:
    """A process's start time (the 22nd field of its stat): with its pid, who it is; None once gone."""
    fields = stat_fields(pid)
    return fields[19] if fields else None


def starters() -> list[int]:
    """The process that started this one: the parent, and, when the parent is a shell running one
    command for it (`sh -c CMD`: DVC's way with a shell that does not exec its command, such as
    dash), the parent's parent too."""
    parent = os.getppid()
    try:
        argv = Path(f"/proc/{parent}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return [parent]
    shell = len(argv) >= 3 and Path(argv[0].decode(errors="replace")).name in ("sh", "dash", "bash", "zsh", "ksh") \
        and b"-c" in argv
    fields = stat_fields(parent) if shell else None
    grandparent = int(fields[1]) if fields else 0
    return [parent, grandparent] if grandparent > 1 else [parent]


def die_with_parent() -> None:
    """SIGKILL this process when its parent dies (Linux; elsewhere nothing)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def die_with_starter() -> None:
    """Be killed (SIGKILL: no handler runs, nothing more is written) as soon as the process that
    started this one dies, even by SIGKILL: a stage must not outlive the run that DVC reports as
    failed, nor write beside the next one. Linux: the kernel's parent-death signal for the parent,
    and a watch every half second on a shell's parent. Elsewhere nothing."""
    if not sys.platform.startswith("linux") or os.getppid() == 1:
        return
    die_with_parent()
    watched = {pid: started_at(pid) for pid in starters()}
    if any(start is None for start in watched.values()):  # gone already, before the signal was set
        os.kill(os.getpid(), signal.SIGKILL)
    if len(watched) == 1:  # the parent alone: the kernel's signal covers it
        return

    def watch() -> None:
        pause = threading.Event()
        while not pause.wait(WATCH_SECONDS):
            if any(started_at(pid) != start for pid, start in watched.items()):
                os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="die-with-starter", daemon=True).start()


def run_stage(main: Callable[[], object]):
    """Run `main` with logging set up; returns what it returns."""
    if not gc.isenabled():  # the program's imports are done (stages/__init__.py)
        gc.freeze()
        gc.enable()
    die_with_starter()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    try:
        return main()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    except PermissionError as err:
        # A read-only data/ or models/ folder: say which path, not a traceback.
        print(f"error: {err.filename or err}: permission denied; make it writable or run elsewhere", file=sys.stderr)
        sys.exit(1)
    except OSError as err:
        if err.filename is None:
            raise
        print(f"error: {err.filename}: {err.strerror}; check the path and its permissions", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        # Ctrl-C, or SIGTERM turned into it (train), even while cleaning up: the usual status, no traceback.
        print("interrupted", file=sys.stderr)
        sys.exit(130)
