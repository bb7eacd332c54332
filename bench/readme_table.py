"""Put a generated table into README.md between `<!-- NAME:start -->` and `<!-- NAME:end -->`."""

from __future__ import annotations

import re
from pathlib import Path

README = Path("README.md")


def replace_block(name: str, text: str, readme: Path = README) -> None:
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    content = readme.read_text(encoding="utf-8")
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    if not pattern.search(content):
        raise SystemExit(f"{readme}: no {start} ... {end} block; add one where the table belongs")
    readme.write_text(pattern.sub(lambda _: f"{start}\n{text.strip()}\n{end}", content), encoding="utf-8")


def publish(name: str, table: str, results: Path) -> None:
    """Write a benchmark's table to its results file and into the README's block of that name."""
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(table + "\n", encoding="utf-8")
    replace_block(name, table)
    print(f"wrote {results} and {README}")
