"""How big the `.venv` is with torch's CUDA build (what pip takes from PyPI on Linux), and about how
big with its CPU build.

    python -m bench.venv_size --cpu-torch 'torch==2.13.0'

Measures the project's `.venv` (`du -sk`) and its CUDA share (torch, nvidia/, triton/, the cuda
packages); installs `--cpu-torch`, a CPU build of torch that pip can reach (PyTorch's CPU index, or
a wheel on local disk), into a throwaway venv and measures torch there. The CPU `.venv` is then
estimated as the `.venv` less its CUDA share plus the CPU torch. Writes bench/results/venv_size.md
and the `venv-size` block of docs/scaling.md.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from datetime import date
from pathlib import Path

from bench.publish import machine, publish

RESULTS = Path("bench/results/venv_size.md")
CUDA_PARTS = re.compile(r"torch|nvidia|triton|cuda|cuda_\w+")


def size_mb(*paths: Path) -> float:
    if not paths:
        return 0.0
    out = subprocess.run(["du", "-skc", *map(str, paths)], capture_output=True, text=True, check=True).stdout
    return int(out.splitlines()[-1].split()[0]) / 1024


def site_packages(venv: Path) -> Path:
    return next((venv / "lib").glob("python*/site-packages"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-torch", required=True, help="a pip requirement that resolves to a CPU build of torch")
    args = parser.parse_args()
    venv = Path(".venv")
    cuda = [p for p in site_packages(venv).iterdir() if CUDA_PARTS.fullmatch(p.name)]
    total, cuda_mb = size_mb(venv), size_mb(*cuda)
    with tempfile.TemporaryDirectory() as scratch:
        other = Path(scratch) / "venv"
        subprocess.run([sys.executable, "-m", "venv", str(other)], check=True)
        subprocess.run([str(other / "bin/pip"), "install", "--quiet", "--no-deps", args.cpu_torch], check=True)
        version = version_of(other)
        cpu_torch = size_mb(site_packages(other) / "torch")
    table = "\n".join([
        f"Measured {date.today().isoformat()} on {machine()} by `python -m bench.venv_size --cpu-torch "
        f"'{args.cpu_torch}'`.",
        "",
        "| | size |",
        "|---|---|",
        f"| the project's `.venv` (torch {version_of(venv)}) | {total / 1024:.1f} GB |",
        f"| of which torch, `nvidia/`, `triton/` and the cuda packages | {cuda_mb / 1024:.1f} GB |",
        f"| torch {version} installed alone | {cpu_torch / 1024:.2f} GB |",
        f"| the `.venv` with that CPU build instead (estimated) | {(total - cuda_mb + cpu_torch) / 1024:.1f} GB |",
    ])
    publish("venv-size", table, RESULTS)


def version_of(venv: Path) -> str:
    """The torch a venv holds, read from its metadata (torch alone, without its dependencies, does
    not import)."""
    probe = "import importlib.metadata as m; print(m.version('torch'))"
    return subprocess.run([str(venv / "bin/python"), "-c", probe], capture_output=True, text=True,
                          check=True).stdout.strip()


if __name__ == "__main__":
    main()
