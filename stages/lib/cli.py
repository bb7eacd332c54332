"""What every stage's `main` shares: logging set-up and the one-line error for bad input."""

from __future__ import annotations

import gc
import logging
import sys
from typing import Callable


class UserError(Exception):
    """Bad input the user can fix: printed as one line, no traceback, exit status 1."""


def run_stage(main: Callable[[], object]):
    """Run `main` with logging set up; returns what it returns."""
    if not gc.isenabled():  # the program's imports are done (stages/__init__.py)
        gc.freeze()
        gc.enable()
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
