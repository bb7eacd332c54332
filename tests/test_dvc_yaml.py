"""The pipeline files (dvc.yaml, release/dvc.yaml, audit/dvc.yaml) say exactly what each stage
reads: its code (the import closure, less plumbing), its params key by key, and the check stage in
front of them."""

from __future__ import annotations

import importlib
import json
import os
import zipfile

import pytest
import yaml
from pydantic import BaseModel

from tests.conftest import PROJECT_ROOT
from tools.code_deps import PIPELINES, PLUMBING, import_closure, stage_code_deps

FILES = {name: yaml.safe_load((PROJECT_ROOT / name).read_text()) for name in PIPELINES}
PIPELINE = {stage: spec for data in FILES.values() for stage, spec in data["stages"].items()}
LOOP = ["check", "download", "index", "weights", "features", "leaks", "train", "evaluate"]


def test_the_loop_ships_and_audits_are_three_files_run_from_the_root():
    assert list(FILES["dvc.yaml"]["stages"]) == LOOP
    assert list(FILES["release/dvc.yaml"]["stages"]) == ["export_backbone", "export", "latency"]
    assert list(FILES["audit/dvc.yaml"]["stages"]) == ["suspects", "heatmaps"]
    assert sum(len(data["stages"]) for data in FILES.values()) == len(PIPELINE)  # no name twice
    for name in ("release/dvc.yaml", "audit/dvc.yaml"):
        assert all(stage["wdir"] == ".." for stage in FILES[name]["stages"].values()), name
    assert all("wdir" not in stage for stage in FILES["dvc.yaml"]["stages"].values())


def declared_params(stage: dict) -> list[str]:
    return [key for key in stage.get("params", []) if isinstance(key, str)]


@pytest.mark.parametrize("name", sorted(PIPELINE))
def test_code_deps_are_exactly_the_files_the_stage_imports_less_plumbing(name):
    declared = [dep for dep in PIPELINE[name]["deps"] if dep.startswith("stages/")]
    expected = stage_code_deps(name)
    assert declared == expected, (
        f"{name}: dvc.yaml lists {sorted(set(declared) - set(expected))} that it does not import, and misses "
        f"{sorted(set(expected) - set(declared))} (or has them in another order); run `make deps`")
    data = [dep for dep in PIPELINE[name]["deps"] if not dep.startswith("stages/")]
    assert PIPELINE[name]["deps"] == data + declared, f"{name}: the data deps come first, then the code"


def test_plumbing_decides_nothing_a_stage_writes():
    # The launcher and the error reporting import nothing of the project but each other.
    for path in sorted(PLUMBING):
        module = path.removesuffix(".py").removesuffix("/__init__").replace("/", ".")
        assert import_closure(module) <= PLUMBING, path


def test_the_library_never_imports_a_stage():
    for module in sorted((PROJECT_ROOT / "stages/lib").glob("*.py")):
        imported = import_closure(f"stages.lib.{module.stem}")
        assert {path for path in imported if not path.startswith("stages/lib/")} == {"stages/__init__.py"}, module


def test_every_stage_waits_for_the_check_and_declares_each_param_once():
    check = PIPELINE["check"]
    assert check["always_changed"] and "params" not in check
    assert check["outs"] == ["data/params.ok", "data/source.json"]
    for name, stage in PIPELINE.items():
        if name != "check":
            assert stage["deps"][0] == "data/params.ok", name
        # Once: not beside a section that holds it, and nowhere as a file (params: is DVC's own tracking).
        declared = declared_params(stage)
        assert not [key for key in declared if any(key.startswith(other + ".") for other in declared)], name
        assert len(declared) == len(set(declared)), name
        assert not [dep for dep in stage["deps"] if dep.startswith("data/params") and dep != "data/params.ok"], name
    assert PIPELINE["download"]["deps"][:2] == ["data/params.ok", "data/source.json"]


def test_every_stage_runs_through_python_m_stages():
    import subprocess
    import sys

    from stages.__main__ import STAGES

    assert {name: stage["cmd"] for name, stage in PIPELINE.items()} == {
        name: f"python -m stages {name}" for name in STAGES}
    result = subprocess.run([sys.executable, "-m", "stages", "nonsense"], cwd=PROJECT_ROOT, capture_output=True,
                            text=True)
    assert result.returncode == 1 and result.stderr.startswith("usage: python -m stages {check,download,index,")


def test_make_deps_writes_what_the_test_expects(tmp_path):
    from tools.code_deps import write_into_pipeline

    for name, stage, stale, needed in (("dvc.yaml", "stages/train.py", "stages/lib/leaks.py", "stages/lib/training.py"),
                                       ("audit/dvc.yaml", "stages/suspects.py", "stages/lib/leaks.py",
                                        "stages/lib/folds.py")):
        copy = tmp_path / name.replace("/", "_")
        text = (PROJECT_ROOT / name).read_text()
        # A code dep missing and a stale one present: the generator puts the right list back.
        copy.write_text(text.replace(f"{stage}, ", f"{stage}, {stale}, ", 1).replace(needed, "", 1)
                        .replace(", ]", "]").replace(", ,", ","))
        assert copy.read_text() != text
        write_into_pipeline(copy)
        assert copy.read_text() == text, name


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


def leaf_keys(key: str) -> list[str]:
    """A declared key as the params it stands for: itself, or every key of the section it names."""
    from stages.lib.params import Params

    model = Params
    for part in key.split("."):
        annotation = model.model_fields[part].annotation
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return [key]
        model = annotation
    return [leaf for name in model.model_fields for leaf in leaf_keys(f"{key}.{name}")]


# Params a stage reads only on a path this test does not take (the tiny project's archive is a
# local file of flat class folders, without a labels CSV): declared all the same, as they decide
# the stage's outputs there.
READ_ELSEWHERE = {"download": {"data.timeout", "data.retries", "data.retry_backoff"},
                  "index": {"index.label_column", "index.path_column", "index.split_column", "index.val_fraction"}}


@pytest.mark.slow  # runs every stage once
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
    # check reads every param (it validates them all) and declares none: it always runs.
    for name in [stage for stage in PIPELINE if stage != "check"]:
        seen: set[str] = set()
        module = importlib.import_module(f"stages.{name}")
        if hasattr(module, "load_params"):
            monkeypatch.setattr(module, "load_params", lambda seen=seen: Recorder(real_load(), "", seen))
        module.main()
        declared = declared_params(PIPELINE[name])
        undeclared = sorted(read for read in seen if not covered(read, declared))
        # Key by key: a stage that declares a whole section must read every key of it.
        leaves = [leaf for key in declared for leaf in leaf_keys(key)]
        unread = sorted(leaf for leaf in leaves if not any(leaf == read or leaf.startswith(read + ".") for read in seen)
                        and leaf not in READ_ELSEWHERE.get(name, set()))
        assert not undeclared and not unread, f"{name} reads {undeclared} undeclared; declares {unread} unread"
    assert json.loads((root / "metrics/eval/summary.json").read_text())["images"] > 0
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
