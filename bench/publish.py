"""Where the benchmarks' tables go: their results file, and the block of that name in a page under
docs/ (between `<!-- NAME:start -->` and `<!-- NAME:end -->`); and the machine they ran on."""

from __future__ import annotations

import os
import platform
import re
from pathlib import Path

PAGES = [Path("README.md"), *sorted(Path("docs").glob("*.md"))]


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def machine() -> str:
    """`AMD EPYC, 2 cores`: what a figure's reader needs to compare it with their own."""
    return f"{cpu_name()}, {os.cpu_count()} cores"


def replace_block(name: str, text: str, pages: list[Path] = PAGES) -> Path:
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    for page in pages:
        content = page.read_text(encoding="utf-8")
        if pattern.search(content):
            page.write_text(pattern.sub(lambda _: f"{start}\n{text.strip()}\n{end}", content), encoding="utf-8")
            return page
    raise SystemExit(f"no {start} ... {end} block in README.md or docs/; add one where the table belongs")


def publish(name: str, table: str, results: Path) -> None:
    """Write a benchmark's table to its results file and into its block in README.md or docs/."""
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(table + "\n", encoding="utf-8")
    page = replace_block(name, table)
    print(f"wrote {results} and {page}")
