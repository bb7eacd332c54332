"""Which project files each stage's module imports, transitively, imports inside functions included.

dvc.yaml must list exactly these as the stage's code deps (tests/test_dvc_yaml.py checks it):
a shared module edited reruns every stage that uses it, and only those.
`python -m tests.code_deps` prints the lists; `python -m tests.code_deps --write` puts them into
dvc.yaml in place of each stage's `stages/` deps (other deps and comments are kept).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "stages"


def module_file(name: str) -> Path | None:
    """The project file of a dotted module name, or None if it is not one of ours."""
    if name != PACKAGE and not name.startswith(PACKAGE + "."):
        return None
    base = ROOT.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported_modules(path: Path) -> set[str]:
    """Dotted names of every module `path` imports, anywhere in the file, with their packages."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            # `from stages.lib import cli` imports the module stages.lib.cli
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    with_packages = set()
    for name in names:
        parts = name.split(".")
        with_packages.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return with_packages


def import_closure(module: str) -> set[str]:
    """Project files (relative, posix) that running `module` can import."""
    seen: set[Path] = set()
    todo = [module, PACKAGE]
    while todo:
        path = module_file(todo.pop())
        if path is None or path in seen:
            continue
        seen.add(path)
        todo.extend(imported_modules(path))
    return {p.relative_to(ROOT).as_posix() for p in seen}


def stage_code_deps(stage: str) -> set[str]:
    """What `python -m stages STAGE` runs: stages/__main__.py and the stage module's closure."""
    return import_closure(f"{PACKAGE}.{stage}") | import_closure(f"{PACKAGE}.__main__")


def write_into_pipeline(pipeline: Path) -> None:
    import re

    text = pipeline.read_text(encoding="utf-8")
    for stage in re.findall(r"^  ([a-z_]+):\n    cmd:", text, flags=re.M):
        block = re.compile(rf"(^  {stage}:\n    cmd:.*\n    deps:\n(?:      - (?!stages/).*\n)*)((?:      - stages/.*\n)*)", re.M)
        code = "".join(f"      - {path}\n" for path in sorted(stage_code_deps(stage)))
        text = block.sub(lambda match: match.group(1) + code, text, count=1)
    pipeline.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    import sys

    from stages.__main__ import STAGES

    if sys.argv[1:] == ["--write"]:
        write_into_pipeline(ROOT / "dvc.yaml")
    else:
        for stage in STAGES:
            print(f"{stage}:")
            for path in sorted(stage_code_deps(stage)):
                print(f"      - {path}")
