"""`python -m stages.predict` and the `dvc-transfer-predict` console script."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from stages import evaluate, predict
from stages.lib.cli import UserError
from stages.lib.files import read_tensors
from tests.conftest import PROJECT_ROOT


@pytest.fixture
def trained_project(trained_copy):
    evaluate.main()
    return trained_copy


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


@pytest.mark.slow  # two fresh processes importing torch
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


def one_line_error(root, *args) -> str:
    env = dict(os.environ, PYTHONPATH=str(PROJECT_ROOT))
    result = subprocess.run([sys.executable, "-m", "stages.predict", *args], cwd=root, env=env, capture_output=True,
                            text=True)
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_a_bad_model_file_is_one_line_naming_it(trained_copy):
    root = trained_copy
    image = str(next((root / "data/raw").rglob("*.png")))
    truncated = root / "models/truncated.safetensors"
    whole = (root / "models/model.safetensors").read_bytes()
    truncated.write_bytes(whole[:len(whole) // 2])
    photo = root / "photo.jpg"
    photo.write_bytes(b"\xff\xd8\xff\xe0 not really a photo")

    def refusal(model: str) -> str:
        with pytest.raises(UserError) as error:
            predict.main([image, "--model", model, "--workers", "0"])
        assert "\n" not in str(error.value)
        return str(error.value)

    assert refusal(str(truncated)).startswith(f"{truncated}: not a readable model checkpoint (")
    assert refusal("models/pretrained.pt") == (
        "models/pretrained.pt: a PyTorch file, not a model checkpoint; "
        "give the models/model.safetensors the train stage writes, or retrain it (dvc repro)")
    assert refusal(str(photo)).startswith(f"{photo}: not a readable model checkpoint")
    # The cause shortened at a word's end, never inside one
    cause = refusal(str(truncated)).split(" (", 1)[1].rsplit("); give the", 1)[0]
    try:
        read_tensors(truncated)
    except Exception as error:  # noqa: BLE001 - whatever safetensors says, the line must not cut a word of it
        said = str(error).splitlines()[0]
    kept = cause.removesuffix(" ...")
    assert len(cause) <= 120 and said.startswith(kept) and said[len(kept):len(kept) + 1] in ("", " "), (cause, said)
    # A TorchScript file as the model: one line, no warning from torch before it
    scripted = root / "models/scripted.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(scripted))
    assert one_line_error(root, image, "--model", str(scripted)).startswith(
        f"error: {scripted}: a PyTorch file, not a model checkpoint;")
    assert refusal("models/nothing.pt") == "models/nothing.pt: not found; run the train stage first (dvc repro)"
    # As a command: that one line on stderr, no traceback.
    assert one_line_error(root, image, "--model", str(truncated)).startswith(
        f"error: {truncated}: not a readable model checkpoint (")


def test_out_dash_is_standard_output(trained_copy, capsys):
    image = next((trained_copy / "data/raw").rglob("*.png"))
    assert predict.main([str(image), "--out", "-", "--workers", "0"]) == 0
    printed = capsys.readouterr().out
    assert printed.splitlines()[0].startswith("path,predicted,probability") and str(image) in printed
    assert not (trained_copy / "-").exists()


def test_out_follows_links_and_never_replaces_them(trained_copy):
    root = trained_copy
    image = str(next((root / "data/raw").rglob("*.png")))
    target = root / "results/target.csv"
    target.parent.mkdir()
    target.write_text("old\n")
    link = root / "link.csv"
    link.symlink_to(target)
    assert predict.main([image, "--out", str(link), "--workers", "0"]) == 0
    assert link.is_symlink() and target.read_text().startswith("path,predicted")
    # A link to a device is written through; the link stays (as root, /dev/stdout would be replaced).
    device_link = root / "to_null"
    device_link.symlink_to("/dev/null")
    assert predict.main([image, "--out", str(device_link), "--workers", "0"]) == 0
    assert device_link.is_symlink() and Path("/dev/null").is_char_device()
    with pytest.raises(UserError, match=r"results: is a folder; give a file name"):
        predict.main([image, "--out", "results", "--workers", "0"])
    # A read-only file is the user's to keep: refused before any image is classified, left as it was.
    kept = root / "kept.csv"
    kept.write_text("mine\n")
    kept.chmod(0o444)
    with pytest.raises(UserError, match=r"^kept.csv: is read-only; make it writable \(chmod u\+w\) or give another"):
        predict.main([image, "--out", "kept.csv", "--workers", "0", "--model", "models/missing.safetensors"])
    assert kept.read_text() == "mine\n" and sorted(p.name for p in root.glob(".*.tmp")) == []


@pytest.mark.parametrize("predictor", ["project", "exported"])
def test_a_bad_option_names_only_options_the_predictor_has(predictor, capsys):
    from stages.lib import serve

    parse = predict.parse_args if predictor == "project" else serve.parse_args
    has = {"project": "--workers", "exported": "--threads"}[predictor]
    lacks = {"project": "--threads", "exported": "--workers"}[predictor]
    for argv, said in ((["x.jpg", "--top-k", "0"], "--top-k and --batch-size must be at least 1"),
                       (["x.jpg", has, "-1"], f"{has} must be at least 0")):
        with pytest.raises(SystemExit) as exit_:
            parse(argv)
        error = capsys.readouterr().err.strip().splitlines()[-1]
        assert exit_.value.code == 2 and error.endswith(f"error: {said}") and lacks not in error, error


def test_min_confidence_answers_unknown_below_it(trained_copy, caplog):
    root = trained_copy
    folder = root / "data/raw"
    predict.main([str(folder), "--out", "all.csv", "--workers", "0"])
    answers = pd.read_csv(root / "all.csv", keep_default_na=False)
    threshold = float(answers.probability.median())
    with caplog.at_level("INFO"):
        predict.main([str(folder), "--out", "sure.csv", "--workers", "0", "--min-confidence", str(threshold)])
    sure = pd.read_csv(root / "sure.csv", keep_default_na=False)
    below = answers.probability < threshold
    assert (sure.predicted[below] == "unknown").all() and (sure.predicted[~below] == answers.predicted[~below]).all()
    assert sure.probability.tolist() == answers.probability.tolist()  # the probabilities stay for the record
    assert f"{int(below.sum())} unknown (below --min-confidence {threshold:g})" in caplog.text
    with pytest.raises(SystemExit):
        predict.main([str(folder), "--min-confidence", "1.5"])
