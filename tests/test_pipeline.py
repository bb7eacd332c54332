"""End to end: `dvc repro` in a git+DVC copy of the project on a tiny archive, prepared once per
session; each test works on its own copy of that reproduced project."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import (
    PROJECT_ROOT,
    deep_merge,
    tiny_training_params,
    write_gradient_image,
    write_random_backbone,
    zip_tree,
)

VENV_BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slow  # a session-wide `dvc repro` and a dozen DVC commands: about two minutes


def run(args: list[str], cwd: Path, env: dict, ok: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    if ok:
        assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result


def output(args: list[str], cwd: Path, env: dict) -> str:
    result = run(args, cwd, env)
    return result.stdout + result.stderr


NUMERIC_CLASSES = ("0", "1", "10", "02")
# The check stage always runs (it fingerprints a local data folder), so DVC calls it changed.
UP_TO_DATE = {"check": ["always changed"]}
LOOP = ["check", "download", "index", "weights", "features", "leaks", "train", "evaluate"]
RELEASE = ["export_backbone", "export", "latency"]
AUDIT = ["suspects", "heatmaps"]


def width(text: str) -> int:
    return max(len(line.rstrip()) for line in text.splitlines())


def stages_run(text: str) -> list[str]:
    """The stages a DVC command ran, by name (`release/dvc.yaml:export` as `export`)."""
    return [line.split("'")[1].split(":")[-1] for line in text.splitlines() if line.startswith("Running stage")]


def project_env(mirror: Path) -> dict:
    env = dict(os.environ, DATA_MIRROR=str(mirror))
    # dvc.yaml says `python -m stages X`: it must be the interpreter running the tests.
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env.pop("PYTHONPATH", None)
    return env


def project_cache_type() -> str:
    """The link types this project's .dvc/config gives DVC's cache, for the test projects too."""
    import configparser

    config = configparser.ConfigParser()
    config.read(PROJECT_ROOT / ".dvc/config")
    return config["cache"]["type"].strip('"')


def cache_objects_hold_their_hashes(work: Path) -> bool:
    """Every file in the DVC cache has the md5 its name says: nothing wrote into a linked output."""
    objects = [path for path in (work / ".dvc/cache/files/md5").rglob("*") if path.is_file()]
    assert objects
    return all(hashlib.md5(path.read_bytes()).hexdigest() == path.parent.name + path.name.removesuffix(".dir")
               for path in objects)


@pytest.fixture(scope="session")
def reproduced(tmp_path_factory) -> tuple[Path, dict, str]:
    """A git+DVC project holding this project's stages, whose data.url names a tiny archive that
    only $DATA_MIRROR has, after one `dvc repro` (committed); and that repro's output."""
    base = tmp_path_factory.mktemp("e2e")
    work, mirror, source = base / "project", base / "mirror", base / "source"
    work.mkdir()
    for name in ("dvc.yaml", "release/dvc.yaml", "audit/dvc.yaml", "params.yaml"):
        (work / name).parent.mkdir(exist_ok=True)
        shutil.copy(PROJECT_ROOT / name, work / name)
    shutil.copytree(PROJECT_ROOT / "stages", work / "stages", ignore=shutil.ignore_patterns("__pycache__"))
    # Classes named by numbers, as digits' folders are: the strings "0", "1", "10" and "02" throughout
    # (a reader that took them for numbers would make "02" the class 2, which the model does not know).
    for split, first, count in (("train", 0, 5), ("val", 5, 3)):
        for c, name in enumerate(NUMERIC_CLASSES):
            for i in range(first, first + count):
                write_gradient_image(source / f"tiny_data/{split}/{name}/{name}_{i}.png",
                                     (200 - 60 * c, 10 * i, 20 + 60 * c))
    mirror.mkdir()
    write_random_backbone(work / "tiny_backbone.pt")
    zip_tree(source, mirror / "tiny_data.zip")
    params = deep_merge(
        yaml.safe_load((work / "params.yaml").read_text()),
        tiny_training_params("tiny_backbone.pt",
                             data={"url": "https://example.invalid/datasets/tiny_data.zip", "sha256": None}),
    )
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = project_env(mirror)
    for args in (["git", "init", "-q"], ["git", "config", "user.email", "t@example.invalid"],
                 ["git", "config", "user.name", "test"], ["dvc", "init", "-q"],
                 ["dvc", "config", "core.analytics", "false"],
                 ["dvc", "config", "cache.type", project_cache_type()], ["git", "add", "-A"],
                 ["git", "commit", "-qm", "project"]):
        run(args, work, env)
    first = output(["dvc", "repro", "--all-pipelines"], work, env)  # what `make run` does
    run(["git", "add", "-A"], work, env)
    run(["git", "commit", "-qm", "baseline"], work, env)
    return work, env, first


@pytest.fixture
def project_copy(reproduced, tmp_path) -> tuple[Path, dict]:
    work, env, _ = reproduced
    copy = tmp_path / "project"
    shutil.copytree(work, copy, symlinks=True)
    return copy, env


def test_repro_runs_every_stage_once_then_nothing(reproduced):
    work, env, first = reproduced
    assert "using offline copy" in first and "tiny_data.zip" in first
    ran = stages_run(first)
    assert sorted(ran) == sorted(LOOP + RELEASE + AUDIT) and ran[:2] == ["check", "download"], ran
    assert json.loads((work / "metrics/leaks/summary.json").read_text())["threshold"] == 0.82
    summary = json.loads((work / "metrics/index/summary.json").read_text())
    assert summary["counts"]["test"]["total"] == 12 and summary["images"] == 32
    assert json.loads((work / "metrics/data.json").read_text()) == {"images": 32}
    assert json.loads((work / "metrics/eval/summary.json").read_text())["images"] == 12
    assert set(json.loads((work / "metrics/eval.json").read_text())) == {"accuracy", "macro_f1", "ece"}
    assert set(json.loads((work / "metrics/train.json").read_text())) == {"val_accuracy"}
    assert set(json.loads((work / "metrics/leaks.json").read_text())) == {"leaks"}
    # The on-demand stages' headline metrics name the model or the index they describe.
    model_md5 = hashlib.md5((work / "models/model.safetensors").read_bytes()).hexdigest()
    index_md5 = hashlib.md5((work / "data/index.csv").read_bytes()).hexdigest()
    assert json.loads((work / "metrics/export.json").read_text()) == {"int8": 1, "md5": model_md5[:7]}
    assert json.loads((work / "metrics/suspects.json").read_text())["md5"] == index_md5[:7]
    assert json.loads((work / "metrics/export/summary.json").read_text())["model_md5"] == model_md5
    latency = json.loads((work / "metrics/latency.json").read_text())  # a plain output: timings are not metrics
    assert "onnx_fp32_latency_ms_median" in latency and latency["model_md5"] == model_md5
    shown = output(["dvc", "metrics", "show"], work, env)
    assert width(shown) <= 120 and "latency" not in shown and "metrics/export.json" in shown, shown
    assert json.loads(output(["dvc", "status", "--json"], work, env)) == UP_TO_DATE
    again = output(["dvc", "repro", "--all-pipelines"], work, env)
    assert stages_run(again) == ["check"] and "didn't change, skipping" in again
    classes_are_text_everywhere(work, env, work / "data/raw/tiny_data/val", 12)


def classes_are_text_everywhere(work: Path, env: dict, images: Path, count: int) -> None:
    """Classes named by numbers stay those strings in every table the pipeline writes and reads,
    the shipped folder's answers and the compare command included (the same names from a labels
    CSV: tests/test_numeric_classes.py)."""
    classes = sorted(NUMERIC_CLASSES, key=lambda name: (int(name), name))  # numerically, as class ids go: 0 1 02 10
    assert json.loads((work / "data/classes.json").read_text()) == classes
    tables = {"data/index.csv": ["class"], "metrics/predictions.csv": ["true", "predicted"],
              "metrics/suspects/label_errors.csv": ["given", "true"], "metrics/eval/per_class.csv": ["class"]}
    for name, columns in tables.items():
        with open(work / name, newline="") as stream:
            rows = list(csv.DictReader(stream))
        assert rows and all(row[column] in classes for row in rows for column in columns), name
    shipped = run([sys.executable, "models/export/predict.py", str(images), "--out", "-"], work, env)
    answers = list(csv.DictReader(io.StringIO(shipped.stdout)))
    assert len(answers) == count and {row["predicted"] for row in answers} <= set(classes)
    compared = output([sys.executable, "-m", "stages.compare", "HEAD", "workspace"], work, env)
    assert "B - A = +0.00 points" in compared, compared


def test_a_damaged_cache_heals_in_dvc_repro_and_names_each_file(project_copy):
    """Cache entries truncated, zeroed and swapped, and the decode cache edited: `dvc repro` reruns
    index and features (DVC sees their outputs changed), names every damaged file, and writes the
    features of the first run, which began from an empty cache; nothing after them reruns."""
    work, env = project_copy
    features = {name: (work / name).read_bytes() for name in (
        f"data/features/{split}.safetensors" for split in ("train", "val", "test"))}
    entries = sorted((work / "data/cache/features").rglob("*.vec"))
    truncated, zeroed, swapped_a, swapped_b = entries[1], entries[4], entries[6], entries[9]
    for path in (truncated, zeroed, swapped_a, swapped_b):  # DVC's cache links them read-only: unlink first
        data = path.read_bytes()
        path.unlink()
        path.write_bytes(data)
    truncated.write_bytes(truncated.read_bytes()[:10])
    zeroed.write_bytes(bytes(len(zeroed.read_bytes())))
    a, b = swapped_a.read_bytes(), swapped_b.read_bytes()
    swapped_a.write_bytes(b)
    swapped_b.write_bytes(a)
    decode_cache = work / "data/cache/images.json"
    edited = json.loads(decode_cache.read_text())
    edited["images"][next(iter(edited["images"]))][0] += 1
    decode_cache.unlink()
    decode_cache.write_text(json.dumps(edited))
    repro = output(["dvc", "repro"], work, env)
    assert stages_run(repro) == ["check", "index", "features"], repro
    for path in (truncated, zeroed, swapped_a, swapped_b):
        assert f"{path.relative_to(work)}: damaged cache entry (" in repro, path
    assert "data/cache/images.json: damaged (its entries do not match their checksum): rebuilt" in repro
    assert {name: (work / name).read_bytes() for name in features} == features
    assert sorted((work / "data/cache/features").rglob("*.vec")) == entries
    assert json.loads(output(["dvc", "status", "--json"], work, env)) == UP_TO_DATE


def test_a_folder_source_reruns_download_when_its_content_changes_and_commits_compare(project_copy, reproduced):
    work, env = project_copy
    folder = work.parent / "my_photos"
    shutil.copytree(reproduced[0].parent / "source", folder)  # the archive's content, as a folder
    params = yaml.safe_load((work / "params.yaml").read_text())
    params["data"]["url"] = str(folder)
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    # The same files as the archive held: download reruns, and DVC sees data/raw unchanged.
    repro = output(["dvc", "repro"], work, env)
    assert stages_run(repro) == ["check", "download"] and "0 unchanged since the last run" in repro
    photos = sorted(path for path in folder.rglob("*") if path.is_file())
    assert all(path.stat().st_nlink == 1 and path.stat().st_mode & 0o200 for path in photos)  # the user's own
    inodes = {path: path.stat().st_ino for path in (work / "data/raw").rglob("*") if path.is_file()}
    run(["git", "add", "-A"], work, env)
    run(["git", "commit", "-qm", "a folder source"], work, env)
    assert stages_run(output(["dvc", "repro"], work, env)) == ["check"]
    # A photo added to the folder reruns the experiment loop's stages after download, and only those:
    # shipping and audits wait to be asked for.
    write_gradient_image(folder / "tiny_data/train/02/new.png", (120, 200, 30))
    assert stages_run(output(["dvc", "repro"], work, env)) == [
        "check", "download", "index", "features", "leaks", "train", "evaluate"]
    assert json.loads((work / "metrics/data.json").read_text())["images"] == 33
    assert all(path.stat().st_ino == inode for path, inode in inodes.items())  # kept, not copied again
    added = work / "data/raw/tiny_data/train/02/new.png"
    assert added.stat().st_nlink == 2 and not added.stat().st_mode & 0o222  # the cache's file (cache.type hardlink)
    assert all(path.stat().st_nlink == 1 and path.stat().st_mode & 0o200 for path in photos)
    assert cache_objects_hold_their_hashes(work)
    assert set(json.loads(output(["dvc", "status", "--json"], work, env))) == {
        "check", "release/dvc.yaml:export", "release/dvc.yaml:latency", "audit/dvc.yaml:suspects",
        "audit/dvc.yaml:heatmaps"}
    # Metrics are git-tracked, so commits compare without a DVC remote.
    run(["git", "add", "-A"], work, env)
    run(["git", "commit", "-qm", "one more photo"], work, env)
    diff = json.loads(output(["dvc", "metrics", "diff", "HEAD~1", "HEAD", "--json"], work, env))
    assert diff["metrics/data.json"]["images"]["diff"] == 1


def tracked_files(root: Path) -> dict[str, str]:
    """sha256 of every output and metric the pipeline produced (and of params.yaml's neighbours)."""
    files = {}
    for folder in ("data", "models", "metrics"):
        for path in sorted((root / folder).rglob("*")):
            if path.is_file() and "archives" not in path.parts:
                files[path.relative_to(root).as_posix()] = hashlib.sha256(path.read_bytes()).hexdigest()
    return files


def without_check(files: dict[str, str]) -> dict[str, str]:
    """The check stage's own outputs, which DVC removes before running it, left out."""
    return {k: v for k, v in files.items() if k not in ("data/params.ok", "data/source.json")}


def corrupt(params: dict, case: str) -> dict:
    bad = json.loads(json.dumps(params))
    if case == "unknown top-level key":
        bad["foo"] = 1
    elif case == "unknown nested key":
        bad["train"]["learning_rate"] = 0.1
    elif case == "wrong type":
        bad["train"]["lr"] = "fast"
    elif case == "out of range":
        bad["index"]["split_ratios"] = [0.9, 0.2, 0.2]
    elif case == "missing key":
        del bad["evaluate"]["workers"]
    elif case == "missing section key":
        del bad["model"]["tta"]
    return bad


BAD_PARAMS = {
    "unknown top-level key": "error: params.yaml: unknown key 'foo'; remove it or fix its spelling",
    "unknown nested key": "error: params.yaml: unknown key 'train.learning_rate'; remove it or fix its spelling",
    "wrong type": "error: params.yaml: train.lr: Input should be a valid number, unable to parse string as a number "
                  "(got 'fast')",
    "out of range": "error: params.yaml: index.split_ratios: Value error, must be three fractions (train, val, test) "
                    "summing to 1",
    "missing key": "error: params.yaml: missing key 'evaluate.workers'; add it (see docs/parameters.md)",
    "missing section key": "error: params.yaml: missing key 'model.tta'",
}


def test_bad_params_stop_the_run_before_any_output_is_removed(project_copy):
    work, env = project_copy
    good_text = (work / "params.yaml").read_text()
    good = yaml.safe_load(good_text)
    before = tracked_files(work)
    assert "models/model.safetensors" in before and "metrics/train/metrics.json" in before
    for case, message in BAD_PARAMS.items():
        (work / "params.yaml").write_text(yaml.safe_dump(corrupt(good, case), sort_keys=False))
        result = run(["dvc", "repro"], work, env, ok=False)
        assert result.returncode != 0, case
        errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and errors[0].startswith(message), (case, result.stderr)
        assert stages_run(result.stdout) == ["check"], (case, result.stdout)
        assert without_check(tracked_files(work)) == without_check(before), case
    # The same through an experiment, as a user would try it.
    (work / "params.yaml").write_text(good_text)
    result = run(["dvc", "exp", "run", "-S", "train.lr=fast"], work, env, ok=False)
    assert result.returncode != 0 and "error: params.yaml: train.lr: Input should be a valid number" in result.stderr
    assert without_check(tracked_files(work)) == without_check(before)
    # Fixed again: nothing but the check reruns, and the pipeline is up to date.
    (work / "params.yaml").write_text(good_text)
    assert stages_run(output(["dvc", "repro"], work, env)) == ["check"]
    assert json.loads(output(["dvc", "status", "--json"], work, env)) == UP_TO_DATE


def test_dvc_from_the_venv_without_activating_it(project_copy, tmp_path):
    # `.venv/bin/dvc repro` from a shell whose `python` is another interpreter without torch: the
    # stages run again under the project's .venv/bin/python.
    work, env = project_copy
    (work / ".venv").symlink_to(VENV_BIN.parent)
    other_bin = tmp_path / "other_bin"
    other_bin.mkdir()
    (other_bin / "python").symlink_to(Path(sys.base_prefix) / "bin" / "python3")
    bare = dict(env, PATH=f"{other_bin}{os.pathsep}/usr/bin{os.pathsep}/bin")
    assert "torch" in run(["python", "-c", "import torch"], work, bare, ok=False).stderr
    result = run([str(VENV_BIN / "dvc"), "repro", "-s", "-f", "evaluate"], work, bare)
    assert "Running stage 'evaluate'" in result.stdout
    # Without a project venv to fall back on, one line says what to do.
    os.remove(work / ".venv")
    failed = run(["python", "-m", "stages", "evaluate"], work, bare, ok=False)
    assert failed.returncode == 1
    assert failed.stderr.strip().splitlines() == [
        f"error: {other_bin}/python has no torch; activate the project's environment first "
        "(source .venv/bin/activate, set up by make run) or run through make (make repro)"]


def test_experiments_rerun_only_what_their_params_reach_and_queued_ones_share_the_cores(project_copy, reproduced):
    work, env = project_copy
    # The baseline ran on every core; train.workers 0 there.
    baseline = json.loads((reproduced[0] / "metrics/train/time.json").read_text())
    assert baseline["threads"] == len(os.sched_getaffinity(0)) and baseline["loader_workers"] == 0
    # Two experiments queued, run side by side by two workers on one core each: the experiment loop,
    # dvc.yaml. A train param reruns train and evaluate, a frozen model reusing the cached features
    # (strategy=finetune trains the network: the train tests cover it); not the audit's suspects,
    # whose heads have their own settings, nor the export. The checkpoint records every param, so
    # train.workers too reruns what follows train.
    after_train = ["check", "train", "evaluate"]
    queued = {"try-lr": (["train.lr=0.003", "train.workers=2"], after_train),
              "more-workers": (["train.workers=3"], after_train)}
    for name, (settings, _) in queued.items():
        run(["dvc", "exp", "run", "--queue", *[a for s in settings for a in ("-S", s)], "-n", name], work, env)
    # The workers it starts inherit its stdout and stderr and live on for up to 10 s after the queue
    # empties: captured output would be waited for until they end.
    started = subprocess.run(["dvc", "queue", "start", "--jobs", "2"], cwd=work, env={**env, "OMP_NUM_THREADS": "1"},
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert started.returncode == 0

    def finished() -> dict[str, str]:  # an experiment's git ref, refs/exps/<baseline>/NAME, appears when it succeeds
        refs = output(["git", "for-each-ref", "--format=%(refname)", "refs/exps"], work, env).splitlines()
        return {ref.rsplit("/", 1)[1]: ref for ref in refs if ref.rsplit("/", 1)[1] in queued}

    # Polling git costs nothing; each `dvc queue status` takes a second of CPU from the workers.
    deadline = time.monotonic() + 300
    last_status = time.monotonic()
    while len(finished()) < len(queued):
        if time.monotonic() - last_status > 5:
            status = output(["dvc", "queue", "status"], work, env)
            assert "Failed" not in status, status + "".join(
                output(["dvc", "queue", "logs", name], work, env) for name in queued)
            assert time.monotonic() < deadline, status
            last_status = time.monotonic()
        time.sleep(0.2)
    for name, ref in finished().items():
        logged = output(["dvc", "queue", "logs", name], work, env)
        assert stages_run(logged) == queued[name][1], logged
        spent = json.loads(output(["git", "show", f"{ref}:metrics/train/time.json"], work, env))
        assert (spent["threads"], spent["loader_workers"]) == (1, 1), name
        assert "cached test features" in logged
    # A speed setting of evaluate does not retrain.
    experiment = output(["dvc", "exp", "run", "-S", "evaluate.batch_size=4", "-n", "eval-batch"], work, env)
    assert stages_run(experiment) == ["check", "evaluate"]
    rows = {row["Experiment"]: row for row in csv.DictReader(io.StringIO(
        output(["dvc", "exp", "show", "--csv", "--no-pager"], work, env)))}
    assert {"eval-batch", "try-lr", "more-workers"} <= set(rows)
    assert rows["try-lr"]["train.lr"] == "0.003" and rows["more-workers"]["train.workers"] == "3"
    assert rows["try-lr"]["accuracy"] not in ("", "-") and "strategy" in rows["try-lr"]
    # `make exp-show` in 120 columns: the changed param and the test accuracy, and no figure of an
    # on-demand stage (export, suspects) that these experiments did not run.
    # (under `make test`, a sub-make also prints the directories it enters and leaves)
    make = subprocess.run(["make", "--no-print-directory", "-n", "exp-show"], cwd=PROJECT_ROOT, capture_output=True,
                          text=True).stdout
    command = shlex.split(next(line for line in make.splitlines() if "dvc exp show" in line))
    assert command[1:4] == ["exp", "show", "--only-changed"] and "--drop" in command and "--keep" in command
    shown = subprocess.run(["dvc", *command[1:], "--no-pager"], cwd=work, env={**env, "COLUMNS": "120"},
                           capture_output=True, text=True).stdout
    header = shown.splitlines()[1]
    assert width(shown) <= 120 and "train.lr" in header and " accuracy " in header, shown
    assert not {"int8", "md5", "mislabelled"} & {name.split(":")[-1] for name in header.split()}, shown
    plain = output(["dvc", "exp", "show", "--no-pager", "--csv"], work, env).splitlines()[0].split(",")
    assert {"int8", "mislabelled"} <= set(plain)  # in the baseline's files, but left out of the view


def test_push_clone_pull_then_nothing_to_reproduce(project_copy):
    work, env = project_copy
    remote = work.parent / "remote"
    run(["dvc", "remote", "add", "-d", "storage", str(remote)], work, env)
    run(["git", "add", "-A"], work, env)
    run(["git", "commit", "-qm", "remote"], work, env)
    run(["dvc", "push"], work, env)
    clone = work.parent / "clone"
    run(["git", "clone", "-q", str(work), str(clone)], work.parent, env)
    run(["dvc", "pull"], clone, env)
    for path in ("data/raw/tiny_data/train/02", "models/pretrained.pt", "models/model.safetensors",
                 "data/features/test.safetensors", "data/params.ok"):
        assert (clone / path).exists(), path
    assert stages_run(output(["dvc", "repro"], clone, env)) == ["check"]
    # The model registry: a version tag, and the model fetched by name from another place.
    run(["git", "tag", "-a", "image-classifier@v1.0.0", "-m", "Registering artifact image-classifier version v1.0.0"],
        work, env)  # what `gto register image-classifier` makes
    fetched = work.parent / "fetched"
    fetched.mkdir()
    run(["dvc", "artifacts", "get", str(work), "image-classifier", "--rev", "v1.0.0", "-o", "model.safetensors"],
        fetched, env)
    assert (fetched / "model.safetensors").read_bytes() == (work / "models/model.safetensors").read_bytes()
    run(["git", "tag", "-a", "image-classifier-export@v1.0.0", "-m", "export v1.0.0"], work, env)
    run(["dvc", "artifacts", "get", str(work), "image-classifier-export", "-o", "export"], fetched, env)  # the latest
    assert {"model.json", "model.onnx", "predict.py", "images.py", "requirements.txt"} <= {
        p.name for p in (fetched / "export").iterdir()}
