"""dvc.yaml says exactly what each stage reads: its code (the import closure), its params, and
the check_params gate in front of them."""

from __future__ import annotations

import importlib
import json
import os
import zipfile

import pytest
import yaml
from pydantic import BaseModel

from tests.code_deps import stage_code_deps
from tests.conftest import PROJECT_ROOT

PIPELINE = yaml.safe_load((PROJECT_ROOT / "dvc.yaml").read_text())["stages"]


def declared_params(stage: dict) -> list[str]:
    return [key for key in stage.get("params", []) if isinstance(key, str)]


@pytest.mark.parametrize("name", sorted(PIPELINE))
def test_code_deps_are_exactly_the_files_the_stage_imports(name):
    declared = {dep for dep in PIPELINE[name]["deps"] if dep.startswith("stages/")}
    closure = stage_code_deps(name)
    assert declared == closure, (
        f"{name}: dvc.yaml lists {sorted(declared - closure)} that it does not import, and misses "
        f"{sorted(closure - declared)}; `python -m tests.code_deps` prints the right list")


def test_the_library_never_imports_a_stage():
    from tests.code_deps import import_closure

    for module in sorted((PROJECT_ROOT / "stages/lib").glob("*.py")):
        imported = import_closure(f"stages.lib.{module.stem}")
        assert {path for path in imported if not path.startswith("stages/lib/")} == {"stages/__init__.py"}, module


@pytest.mark.parametrize("name", sorted(PIPELINE))
def test_every_declared_param_is_gated_by_check_params(name):
    stage = PIPELINE[name]
    gates = {dep for dep in stage["deps"] if dep.startswith("data/params/")}
    assert gates == {f"data/params/{key}.json" for key in declared_params(stage)}
    if name == "check_params":
        assert stage["params"] == [{"params.yaml": None}] and stage["outs"] == ["data/params"]


def test_every_stage_runs_through_python_m_stages():
    import subprocess
    import sys

    from stages.__main__ import STAGES

    assert {name: stage["cmd"] for name, stage in PIPELINE.items()} == {
        name: f"python -m stages {name}" for name in STAGES}
    result = subprocess.run([sys.executable, "-m", "stages", "nonsense"], cwd=PROJECT_ROOT, capture_output=True, text=True)
    assert result.returncode == 1 and result.stderr.startswith("usage: python -m stages {check_params,source,download,")


# --- each stage reads exactly the params it declares -------------------------------------------

class Recorder:
    """Stands in for the loaded params and notes every key a stage reads (`train.lr`)."""

    def __init__(self, value: BaseModel, path: str, seen: set[str]):
        self._value, self._path, self._seen = value, path, seen

    def __getattr__(self, name: str):
        value = getattr(self._value, name)
        path = f"{self._path}.{name}" if self._path else name
        if isinstance(value, BaseModel):
            return Recorder(value, path, self._seen)
        self._seen.add(path)
        return value

    def model_dump(self, **kwargs):
        self._seen.add(self._path or "<everything>")
        return self._value.model_dump(**kwargs)


def covered(read: str, declared: list[str]) -> bool:
    return any(read == key or read.startswith(key + ".") for key in declared)


def test_each_stage_reads_exactly_the_params_it_declares(tiny_project, monkeypatch, tmp_path):
    from stages.lib import params as params_module

    root = tiny_project(run_features=False, strategy="finetune", train={"head_epochs": 1, "epochs": 1})
    archive = tmp_path / "tiny.zip"
    with zipfile.ZipFile(archive, "w") as zipped:
        for path in sorted((root / "data/raw").rglob("*.png")):
            zipped.write(path, path.relative_to(root / "data/raw").as_posix())
    text = (root / "params.yaml").read_text()
    data = yaml.safe_load(text)
    data["data"].update(url=str(archive), sha256=None)
    (root / "params.yaml").write_text(yaml.safe_dump(data))
    real_load = params_module.load_params
    for name in [stage for stage in PIPELINE if stage != "check_params"]:
        seen: set[str] = set()
        module = importlib.import_module(f"stages.{name}")
        if hasattr(module, "load_params"):
            monkeypatch.setattr(module, "load_params", lambda seen=seen: Recorder(real_load(), "", seen))
        module.main()
        declared = declared_params(PIPELINE[name])
        undeclared = sorted(read for read in seen if not covered(read, declared))
        unread = sorted(key for key in declared if not any(covered(read, [key]) for read in seen))
        assert not undeclared and not unread, f"{name} reads {undeclared} undeclared; declares {unread} unread"
    assert json.loads((root / "metrics/eval.json").read_text())["images"] > 0
    assert os.path.isdir(root / "models/export")


# --- dvc plots show, offline -----------------------------------------------------------------------


def test_the_offline_template_is_built_from_the_vendored_libraries_and_configured():
    import configparser

    from tests.offline_plots import TEMPLATE, build_template

    assert TEMPLATE.read_text(encoding="utf-8") == build_template(), "run python -m tests.offline_plots --write"
    config = configparser.ConfigParser()
    config.read(PROJECT_ROOT / ".dvc/config")
    assert config["plots"]["html_template"] == "plots/offline.html"
    for name in ("vega", "vega-lite", "vega-embed"):
        assert "BSD" in (PROJECT_ROOT / f".dvc/plots/vendor/LICENSE-{name}").read_text() or \
            "Redistribution and use" in (PROJECT_ROOT / f".dvc/plots/vendor/LICENSE-{name}").read_text()


def test_dvc_plots_show_renders_a_page_that_loads_nothing_from_the_network(tmp_path):
    import re
    import subprocess
    import sys
    from pathlib import Path

    dvc = Path(sys.executable).parent / "dvc"
    result = subprocess.run([str(dvc), "plots", "show", "-o", str(tmp_path / "plots")], cwd=PROJECT_ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    page = (tmp_path / "plots/index.html").read_text(encoding="utf-8")
    assert "cdn.jsdelivr" not in page and "<script src" not in page.replace(" ", "")
    attributes = re.findall(r"""\b(?:src|href)\s*=\s*["']([^"']*)["']""", page)
    assert attributes and not [a for a in attributes if re.match(r"(https?:)?//", a)]
    assert page.count("vegaEmbed('#") >= 5  # the interactive charts: curves, confusion, per class, ...
    assert re.search(r"vega.{0,20}5\.20\.2|version.{0,5}5\.20\.2", page) or "vega 5.20.2" in page
