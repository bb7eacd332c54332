"""The typed params loader: every stage stops on a bad params.yaml before doing any work."""

import subprocess
import sys

import pytest
import yaml

from stages.lib.cli import UserError
from stages.lib.params import load_params
from tests.conftest import PROJECT_ROOT


def test_project_params_load():
    params = load_params(PROJECT_ROOT / "params.yaml")
    assert params.index.split_ratios == (0.6, 0.2, 0.2)
    assert params.data.url.endswith("hymenoptera_data.zip")


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"index": {"sede": 1}}, "unknown key 'index.sede'"),
        ({"extra": {"a": 1}}, "unknown key 'extra'"),
        ({"index": {"seed": "forty"}}, "index.seed: Input should be a valid integer"),
        ({"index": {"val_fraction": 1.5}}, "index.val_fraction: Input should be less than 1"),
        ({"index": {"split_ratios": [0.5, 0.2, 0.2]}}, "index.split_ratios: Value error, must be three fractions"),
        ({"data": {"retries": -1}}, "data.retries: Input should be greater than or equal to 0"),
        ({"data": {"sha256": "abc"}}, "data.sha256: String should match pattern"),
    ],
)
def test_bad_params_name_the_key(project, overrides, message):
    project(**overrides)
    with pytest.raises(UserError) as err:
        load_params()
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_key_is_named(project):
    root = project()
    params = yaml.safe_load((root / "params.yaml").read_text())
    del params["data"]["timeout"]
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(UserError, match="missing key 'data.timeout'"):
        load_params()


@pytest.mark.parametrize("command", [["-m", "stages", "download"], ["-m", "stages.download"]])
def test_stage_prints_one_line_and_writes_nothing(project, command):
    # As dvc.yaml runs it (python -m stages NAME), and as the module itself.
    root = project(index={"seed": "x"})
    result = subprocess.run(
        [sys.executable, *command], cwd=root, capture_output=True, text=True,
        env={"PYTHONPATH": str(PROJECT_ROOT), "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "error: params.yaml: index.seed: Input should be a valid integer (got 'x')"
    ]
    assert not (root / "data").exists()


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"train": {"lr": float("inf")}}, "train.lr: Input should be a finite number"),
        ({"data": {"timeout": float("inf")}}, "data.timeout: Input should be a finite number"),
        ({"train": {"weight_decay": float("inf")}}, "train.weight_decay: Input should be a finite number"),
        ({"train": {"lr": float("nan")}}, "train.lr: Input should be a finite number"),
        ({"train": {"epochs": True}}, "train.epochs: Input should be a valid integer (got True)"),
        ({"train": {"lr": True}}, "train.lr: Value error, should be a number, not true or false"),
        ({"train": {"freeze_bn": "yes"}}, "train.freeze_bn: Input should be a valid boolean (got 'yes')"),
        ({"data": {"url": " "}}, "data.url: Value error, should not be blank"),
        ({"index": {"labels": "  "}}, "index.labels: Value error, should not be blank"),
    ],
)
def test_values_that_would_cost_a_model_are_refused(project, overrides, message):
    project(**overrides)
    with pytest.raises(UserError) as err:
        load_params()
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_number_yaml_reads_as_a_string_is_still_a_number(project):
    root = project()
    (root / "params.yaml").write_text((root / "params.yaml").read_text().replace("lr: 0.001", "lr: 1e-3"))
    assert load_params().train.lr == 0.001
