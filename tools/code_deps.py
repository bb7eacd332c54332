"""Each stage's code deps: the project files its module imports, transitively (imports inside
functions included), less the launch plumbing, which cannot change what a stage writes.

Each pipeline file (PIPELINES: the experiment loop, shipping, audits) lists exactly these after
each stage's data deps (tests/test_dvc_yaml.py checks it), so an edited module reruns every stage
that uses it, and only those. `make deps` writes them into the pipeline files; `python -m
tools.code_deps` prints them.
"""

from __future__ import annotations

import ast
import re
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "stages"
PIPELINES = ("dvc.yaml", "release/dvc.yaml", "audit/dvc.yaml")  # the loop, shipping, audits
# How a stage starts and reports a bad input (one line, an exit status): nothing here may decide
# what a stage writes.
PLUMBING = {"stages/__init__.py", "stages/__main__.py", "stages/lib/__init__.py", "stages/lib/cli.py"}
DEPS_BLOCK = re.compile(r"^(  (\w+):\n    cmd: .*\n(?:    (?!deps:).*\n)*)    deps: \[([^\]]*)\]\n", re.M)
INDENT = " " * 11  # under the first entry of `    deps: [`
WIDTH = 118


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


def stage_code_deps(stage: str) -> list[str]:
    """What decides the stage's outputs: its module's closure less the plumbing, the module first."""
    module = f"{PACKAGE}/{stage}.py"
    return [module, *sorted(import_closure(f"{PACKAGE}.{stage}") - PLUMBING - {module})]


def deps_lines(entries: list[str], code: list[str]) -> str:
    """`    deps: [data..., code...]`: the data deps first, the code deps wrapped below them."""
    data = [e for e in entries if not e.startswith(f"{PACKAGE}/")]
    groups = [textwrap.wrap(", ".join(group), WIDTH - len(INDENT), break_on_hyphens=False)
              for group in (data, code) if group]
    return "    deps: [" + f",\n{INDENT}".join(f"\n{INDENT}".join(lines) for lines in groups) + "]\n"


def write_into_pipeline(pipeline: Path) -> None:
    def rewritten(match: re.Match) -> str:
        entries = [e.strip() for e in match.group(3).split(",") if e.strip()]
        return match.group(1) + deps_lines(entries, stage_code_deps(match.group(2)))

    pipeline.write_text(DEPS_BLOCK.sub(rewritten, pipeline.read_text(encoding="utf-8")), encoding="utf-8")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    from stages.__main__ import STAGES

    if sys.argv[1:] == ["--write"]:
        for pipeline in PIPELINES:
            write_into_pipeline(ROOT / pipeline)
    else:
        for stage in STAGES:
            print(f"{stage}: {', '.join(stage_code_deps(stage))}")
