"""For the benchmarks that run commands and DVC experiments in the workspace of a throwaway clone:
a command timed, one experiment on an archive, and the clone's params, lock file and outputs
restored afterwards."""

from __future__ import annotations

import subprocess
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence


def timed(command: Sequence[str], cwd: Path | None = None, echo: bool = False) -> tuple[float, str]:
    """Run a command (`echo`: print it first); its wall seconds and output. A failure stops the bench
    with the end of the output."""
    if echo:
        print("$", " ".join(command), flush=True)
    started = time.perf_counter()
    done = subprocess.run(list(command), cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        print(done.stdout[-5000:])
        raise SystemExit(f"failed ({done.returncode}): {' '.join(command)}")
    return seconds, done.stdout


def run_on_archive(archive: Path, settings: Sequence[str] = (), targets: Sequence[str] = ()) -> float:
    """`dvc exp run` with `data.url` at the archive (unpinned) and `settings`; its wall seconds."""
    overrides = [f"data.url={archive.resolve()}", "data.sha256=null", *settings]
    started = time.perf_counter()
    subprocess.run(["dvc", "exp", "run", *[a for s in overrides for a in ("-S", s)], *targets], check=True)
    return time.perf_counter() - started


@contextmanager
def restored_workspace() -> Iterator[None]:
    try:
        yield
    finally:
        subprocess.run(["git", "checkout", "--", "params.yaml", "dvc.lock", "release/dvc.lock", "audit/dvc.lock",
                        "metrics"], check=True)
        subprocess.run(["dvc", "checkout", "--force", "--quiet"], check=False)
