"""Every `dvc`, `make` and `python -m` command that README.md and docs/ show is one the project
accepts: DVC's own parser takes it, the make target and the module exist, every `-S key=` names a
real param."""

from __future__ import annotations

import importlib.util
import re
import shlex

import pytest
import yaml

from tests.conftest import PROJECT_ROOT

PAGES = [PROJECT_ROOT / "README.md", *sorted((PROJECT_ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)
INLINE = re.compile(r"`([^`\n]+)`")
STARTS = ("dvc ", "make ", "python -m ", "torchrun ")


def split_line(line: str) -> list[list[str]]:
    """The commands of a shell line: its words, split at &&, ; and | outside quotes."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars="&;|")
    lexer.whitespace_split = True
    parts, words = [], []
    for token in lexer:
        if token in ("&&", ";", "|", "||"):
            parts.append(words)
            words = []
        else:
            words.append(token)
    return [*parts, words]


def commands(text: str) -> list[tuple[list[str], bool]]:
    """The commands a page shows, as words, and whether each is whole: a line of a code block (a
    `$ ` prompt and a comment dropped) is; an inline mention in the prose may be a part of one."""
    lines = [(line, True) for block in FENCE.findall(text) for line in block.splitlines()]
    lines += [(span, False) for span in INLINE.findall(FENCE.sub("", text))]
    found = []
    for line, whole in lines:
        line = line.strip().removeprefix("$ ").split(" #")[0]
        for words in split_line(line):
            while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):  # VAR=value before the command
                words.pop(0)
            if " ".join(words).startswith(STARTS):
                found.append((words, whole))
    return found


def shown() -> list[tuple[str, str, bool]]:
    return [(page.name, " ".join(words), whole) for page in PAGES
            for words, whole in commands(page.read_text(encoding="utf-8"))]


def placeholder(word: str) -> bool:
    """NAME, X, <name>, ...: a word the reader replaces."""
    return bool(re.fullmatch(r"[A-Z][A-Z_]*|<[^>]+>|\.\.\.", word))


def make_targets() -> set[str]:
    return set(re.findall(r"^([a-z][\w-]*):", (PROJECT_ROOT / "Makefile").read_text(), re.M))


def param_exists(key: str) -> bool:
    value = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            return False
        value = value[part]
    return True


def test_the_pages_show_commands_of_every_kind():
    kinds = {command.split()[0] for _, command, _ in shown()}
    assert {"dvc", "make", "python"} <= kinds
    assert any(c.startswith("dvc exp run -S") for _, c, _ in shown()) and ("README.md", "make run", True) in shown()


@pytest.mark.parametrize("page, command, whole", shown())
def test_a_command_the_docs_show_is_accepted(page, command, whole):
    words = shlex.split(command)
    if words[0] == "make":
        assert set(words[1:2]) <= make_targets(), f"{page}: make has no target {words[1]}"
        return
    if words[0] in ("python", "torchrun"):
        module = words[words.index("-m") + 1]
        assert importlib.util.find_spec(module) is not None, f"{page}: no module {module}"
        stage = words[words.index("-m") + 2:][:1]
        if module == "stages" and stage and not placeholder(stage[0]):
            from stages.__main__ import STAGES

            assert stage[0] in STAGES, f"{page}: no stage {stage[0]}"
        return
    keys = [words[i + 1].split("=")[0] for i, word in enumerate(words[:-1]) if word in ("-S", "--set-param")]
    for key in keys:
        assert placeholder(key) or param_exists(key), f"{page}: `{command}` sets {key}, not a key of params.yaml"
    if whole:
        from dvc.cli import DvcParserError
        from dvc.cli.parser import get_main_parser

        try:
            get_main_parser().parse_args(words[1:])
        except (SystemExit, DvcParserError):
            pytest.fail(f"{page}: DVC does not accept `{command}`")


def test_readme_is_a_short_front_door():
    readme = (PROJECT_ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 200
    for page in sorted((PROJECT_ROOT / "docs").glob("*.md")):
        assert f"docs/{page.name}" in readme, f"README does not link {page.name}"


def test_every_param_and_every_stage_is_documented():
    params = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())
    keys = [f"{section}.{key}" if isinstance(value, dict) else section
            for section, value in params.items() for key in (value if isinstance(value, dict) else [None])]
    reference = (PROJECT_ROOT / "docs/parameters.md").read_text(encoding="utf-8")
    assert [key for key in keys if f"`{key}`" not in reference] == []
    stages = yaml.safe_load((PROJECT_ROOT / "dvc.yaml").read_text())["stages"]
    table = (PROJECT_ROOT / "docs/stages.md").read_text(encoding="utf-8")
    assert [name for name in stages if f"| {name} | `stages/{name}.py` |" not in table] == []
