"""`python -m stages.predict` and the `dvc-transfer-predict` console script."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from stages import evaluate, predict, train
from tests.conftest import PROJECT_ROOT


@pytest.fixture
def trained_project(tiny_project):
    root = tiny_project(strategy="frozen")
    train.main()
    evaluate.main()
    return root


def test_predict_matches_evaluate_and_reports_unreadable_files(trained_project):
    root = trained_project
    expected = pd.read_csv(root / "metrics/predictions.csv")
    folder = root / "to_classify"
    for i, relative in enumerate(expected.path):
        target = folder / ("nested" if i % 2 else ".") / Path(relative).name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(root / "data/raw" / relative, target)
    (folder / "broken.jpg").write_bytes(b"not an image")
    (folder / "notes.txt").write_text("ignored: not an image name")

    status = predict.main([str(folder), "--out", "out/predictions.csv", "--top-k", "5", "--workers", "0"])
    assert status == 1  # one file failed
    table = pd.read_csv(root / "out/predictions.csv", keep_default_na=False)
    assert list(table.columns) == ["path", "predicted", "probability", "top1_class", "top1_probability",
                                   "top2_class", "top2_probability", "error"]  # top-k capped at 2 classes
    assert len(table) == len(expected) + 1 and not table.path.str.endswith("notes.txt").any()
    broken = table[table.path.str.endswith("broken.jpg")].iloc[0]
    assert broken.predicted == "" and "UnidentifiedImageError" in broken.error
    good = table[table.error == ""].assign(name=lambda t: t.path.map(lambda p: Path(p).name)).set_index("name")
    good = good.astype({c: float for c in good.columns if c.endswith("probability")})
    expected = expected.assign(name=expected.path.map(lambda p: Path(p).name)).set_index("name")
    assert (good.predicted == expected.predicted.reindex(good.index)).all()
    assert good.top1_class.tolist() == good.predicted.tolist()
    assert good.probability.to_numpy() == pytest.approx(expected.probability.reindex(good.index).to_numpy(), abs=1e-4)
    assert (good.top1_probability + good.top2_probability).to_numpy() == pytest.approx(1.0, abs=1e-5)


def test_console_script_and_exit_status(trained_project):
    root = trained_project
    image = next((root / "data/raw").rglob("*.png"))
    script = shutil.which("dvc-transfer-predict", path=str(Path(sys.executable).parent))
    assert script, "pip install -e . installs the dvc-transfer-predict console script"
    env = dict(os.environ, PYTHONPATH=str(PROJECT_ROOT))
    ok = subprocess.run([script, str(image), "--out", "one.csv", "--workers", "0"], cwd=root, env=env,
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert pd.read_csv(root / "one.csv").path.tolist() == [str(image)]
    missing = subprocess.run([sys.executable, "-m", "stages.predict", "nowhere/"], cwd=root, env=env,
                             capture_output=True, text=True)
    assert missing.returncode == 1
    assert missing.stderr.strip().splitlines()[-1] == ("error: nowhere: no such file or folder; "
                                                       "give image files or folders to classify")
