"""Stage `export`: the ONNX model agrees with PyTorch on real photos."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import threading
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pandas as pd
import pytest
import torch

from stages import export, export_backbone
from stages.lib.checkpoint import Checkpoint, read_checkpoint, save_checkpoint
from stages.lib.classifier import make_head
from stages.lib.data import eval_transform
from stages.lib.export import head_graph
from stages.lib.head import head_layers
from stages.lib.images import load_image
from stages.lib.preprocessing import Preprocessing
from tests.conftest import train_with_library

FIXTURES = Path(__file__).parent / "fixtures"
FOLDER = ["README.md", "images.py", "model.json", "model.onnx", "predict.py", "requirements.txt"]


def real_photos(prep: Preprocessing) -> torch.Tensor:
    transform = eval_transform(prep)
    return torch.stack([transform(load_image(path, prep.resize_size)) for path in sorted(FIXTURES.glob("*.jpg"))])


def pytorch_probabilities(checkpoint: Checkpoint, images: torch.Tensor) -> np.ndarray:
    """What the exported model computes, in PyTorch: the softmax of the class scores / temperature."""
    with torch.inference_mode():
        return (checkpoint.classifier()(images) / checkpoint.temperature).softmax(1).numpy()


def check_exports_match_pytorch(root: Path, images: torch.Tensor | None = None) -> None:
    """model.onnx in models/export gives the checkpoint's probabilities (PyTorch) within 1e-4."""
    folder = root / "models/export"
    assert set(FOLDER) <= {p.name for p in folder.iterdir()} <= {*FOLDER, "model.int8.onnx"}
    side = json.loads((folder / "model.json").read_text())
    prep = Preprocessing(side["input_size"], side["resize_size"], tuple(side["mean"]), tuple(side["std"]),
                         side["interpolation"])
    images = real_photos(prep) if images is None else images
    expected = pytorch_probabilities(read_checkpoint(root / "models/model.safetensors"), images)
    np.testing.assert_allclose(expected.sum(1), 1.0, atol=1e-5)

    session = onnxruntime.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["image"]
    from_onnx = session.run(["probabilities"], {"image": images.numpy()})[0]
    np.testing.assert_allclose(from_onnx, expected, atol=1e-4, rtol=0)
    np.testing.assert_allclose(session.run(None, {"image": images[:3].numpy()})[0], expected[:3], atol=1e-4, rtol=0)


@pytest.mark.slow  # builds the real pretrained EfficientNet-Lite0
def test_onnx_matches_pytorch_on_real_photos(tiny_project, caplog):
    # The real EfficientNet-Lite0 (TF-style "same" padding included), with a head trained briefly;
    # frozen, so the export joins the export_backbone stage's backbone with the head.
    root = tiny_project(strategy="frozen", model={"backbone": "efficientnet_lite0", "weights": "pretrained"},
                        train={"head_epochs": 2}, export={"int8": False})  # INT8: the tiny tests below
    train_with_library(root)
    export_backbone.main()
    assert sorted(p.name for p in (root / "models/backbone_export").iterdir()) == [
        "backbone.json", "backbone.onnx"]
    with caplog.at_level("INFO"):
        export.main()
    assert "joining its export" in caplog.text

    side = json.loads((root / "models/export/model.json").read_text())
    assert side["classes"] == ["blue", "red"] and side["input_size"] == 224 and side["resize_size"] == 256
    assert side["mean"] == [0.5, 0.5, 0.5] and side["std"] == [0.5, 0.5, 0.5]
    assert side["input"]["name"] == "image" and side["output"]["name"] == "probabilities" and side["tta"] == "none"
    check_exports_match_pytorch(root)


def test_a_trained_backbone_is_exported_whole(tiny_project, caplog):
    # finetune changes the backbone: the pretrained backbone's export must not be reused.
    root = tiny_project(strategy="finetune", train={"head_epochs": 0, "epochs": 1, "freeze_bn": False})
    train_with_library(root)
    checkpoint = read_checkpoint(root / "models/model.safetensors")
    assert checkpoint.metrics["phase"] == "network" and checkpoint.pretrained_backbone_sha256 is None
    export_backbone.main()
    with caplog.at_level("INFO"):
        export.main()
    assert "joining its export" not in caplog.text
    size = json.loads((root / "models/export/model.json").read_text())["input_size"]
    check_exports_match_pytorch(root, torch.rand(4, 3, size, size, generator=torch.Generator().manual_seed(0)))


def test_a_stale_backbone_export_is_not_reused(trained_copy, caplog):
    # A backbone export made from other weights (its pretrained file's hash differs) is ignored.
    root = trained_copy
    export_backbone.main()
    made_from = root / "models/backbone_export/backbone.json"
    made_from.write_text(json.dumps({**json.loads(made_from.read_text()), "pretrained_sha256": "0" * 64}))
    # A temperature other than 1, so that the comparison below shows the export applies it
    model = root / "models/model.safetensors"
    save_checkpoint(model, replace(read_checkpoint(model), temperature=0.6))
    with caplog.at_level("INFO"):
        export.main()
    assert "joining its export" not in caplog.text
    assert json.loads((root / "models/export/model.json").read_text())["temperature"] == 0.6
    size = json.loads((root / "models/export/model.json").read_text())["input_size"]
    check_exports_match_pytorch(root, torch.rand(4, 3, size, size, generator=torch.Generator().manual_seed(0)))


@pytest.mark.slow  # two stage processes
def test_the_export_is_the_same_bytes_whatever_the_hash_seed(trained_copy):
    # Python salts string hashes per process; nothing in the export may depend on set order.
    # Here in this process (its own seed, random unless PYTHONHASHSEED is set), then in one with another seed.
    root = trained_copy
    export_backbone.main()
    export.main()
    exported = [{p.name: p.read_bytes() for p in sorted((root / "models/export").iterdir())}]
    other_seed = "2" if os.environ.get("PYTHONHASHSEED") == "1" else "1"
    for stage in ("export_backbone", "export"):
        done = subprocess.run([sys.executable, "-m", "stages", stage], cwd=root, capture_output=True, text=True,
                              env=dict(os.environ, PYTHONHASHSEED=other_seed))
        assert done.returncode == 0, done.stderr
    exported.append({p.name: p.read_bytes() for p in sorted((root / "models/export").iterdir())})
    assert exported[0] == exported[1] and set(FOLDER) <= set(exported[0])


def through_backbones(caplog) -> dict[str, int]:
    """Test images the last export run put through each backbone, from its log."""
    found = [re.match(r"(backbone(?:\.int8)?)[-\w]*\.onnx: \d+ test images x \d+ views \((\d+) through it",
                      r.getMessage()) for r in caplog.records]
    return {m.group(1): int(m.group(2)) for m in found if m}


def test_a_new_head_or_new_images_rescore_the_test_split_from_the_export_cache(trained_copy, monkeypatch, caplog):
    from stages import index
    from tests.conftest import write_gradient_image

    root = trained_copy
    set_params(root, int8_tolerance=1.0)  # both models, whatever INT8 scores
    caplog.set_level("INFO")
    monkeypatch.setattr(export, "SCORING_BATCH", 3)  # batches of other images in each run, a lone one too
    export_backbone.main()
    export.main()
    test_images = (pd.read_csv(root / "data/index.csv")["split"] == "test").sum()
    assert through_backbones(caplog) == {"backbone": test_images, "backbone.int8": test_images}
    cache = root / "data/cache/export"

    def outputs() -> dict:
        return {path: (root / path).read_bytes() for path in ("metrics/export.json", "models/export/model.onnx",
                                                             "models/export/model.int8.onnx")}

    def equals_a_run_from_an_empty_cache() -> None:
        incremental, vectors = outputs(), sorted(p.relative_to(cache) for p in cache.rglob("*.vec"))
        shutil.rmtree(cache)
        caplog.clear()
        export.main()
        assert set(through_backbones(caplog).values()) == {test_images}
        assert outputs() == incremental
        assert sorted(p.relative_to(cache) for p in cache.rglob("*.vec")) == vectors

    # Another head on the same backbone: neither backbone runs again
    model = root / "models/model.safetensors"
    checkpoint = read_checkpoint(model)
    state = {k: (v * 1.5 if k.startswith("head.") else v) for k, v in checkpoint.state_dict.items()}
    save_checkpoint(model, replace(checkpoint, state_dict=state, temperature=0.8))
    caplog.clear()
    export.main()
    assert through_backbones(caplog) == {"backbone": 0, "backbone.int8": 0}
    assert "INT8 backbone: quantised on these" in caplog.text  # and no calibration pass either
    equals_a_run_from_an_empty_cache()

    # New test images: only they go through the fp32 backbone (and the INT8 one, unless the
    # calibration sample changed), and what is written is what a run from an empty cache writes
    for i in range(6):
        write_gradient_image(root / f"data/raw/{'red' if i % 2 else 'blue'}/new_{i}.png", (40 * i, 90, 200 - 30 * i))
    index.main()
    table = pd.read_csv(root / "data/index.csv")
    added = table["path"].str.contains("new_") & (table["split"] == "test")
    test_images = (table["split"] == "test").sum()
    assert added.any()
    caplog.clear()
    export.main()
    assert through_backbones(caplog)["backbone"] == added.sum()
    assert through_backbones(caplog)["backbone.int8"] in (added.sum(), test_images)
    equals_a_run_from_an_empty_cache()


@pytest.mark.parametrize("tta", ["none", "hflip"])
def test_the_scores_that_decide_int8_are_the_shipped_folders_own_answers(trained_copy, tta):
    # The export scores each backbone's cached outputs with the head in numpy: the folder's
    # predictor, on the same test images, must give the same classes with both models.
    from stages.lib import serve

    root = trained_copy
    set_params(root, int8_tolerance=1.0)
    model = root / "models/model.safetensors"
    save_checkpoint(model, replace(read_checkpoint(model), temperature=0.7, tta=tta))
    export_backbone.main()
    export.main()
    metrics = json.loads((root / "metrics/export/summary.json").read_text())
    test = pd.read_csv(root / "data/index.csv").query("split == 'test'")
    folder, paths = root / "models/export", [root / "data/raw" / p for p in test["path"]]
    answers = {}
    for int8 in (False, True):
        probs, errors = serve.Model(folder, int8=int8).classify(paths)
        assert not any(errors)
        answers[int8] = np.stack(probs).argmax(1)
    assert metrics["fp32_test_accuracy"] == float((answers[False] == test["label"].to_numpy()).mean())
    assert metrics["int8_test_accuracy"] == float((answers[True] == test["label"].to_numpy()).mean())
    assert metrics["int8_agreement"] == float((answers[True] == answers[False]).mean())


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_the_head_graph_computes_what_pytorch_does(kind):
    # The export's head part is written from the head's arrays, without torch.
    torch.manual_seed(0)
    head = make_head(32, 3, kind=kind, hidden=16, dropout=0.3).eval()
    graph = head_graph(head_layers(head.state_dict()), temperature=0.7)
    onnx.checker.check_model(graph, full_check=True)
    session = onnxruntime.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    features = torch.randn(5, 32) * 3
    with torch.inference_mode():
        expected = (head(features) / 0.7).softmax(1).numpy()
    np.testing.assert_allclose(session.run(["probabilities"], {"features": features.numpy()})[0], expected, atol=1e-6)


def imported_modules(importtime_log: str) -> set[str]:
    """The modules a `python -X importtime` run imported, from its log."""
    return {line.rsplit("|", 1)[1].strip() for line in importtime_log.splitlines() if line.startswith("import time:")}


@pytest.mark.slow  # two stage processes
def test_a_model_on_the_pretrained_backbone_is_evaluated_and_exported_without_torch(trained_copy):
    # What keeps a head-only experiment cheap: of its stages only train starts torch.
    root = trained_copy
    export_backbone.main()
    for stage in ("evaluate", "export"):
        done = subprocess.run([sys.executable, "-X", "importtime", "-m", "stages", stage], cwd=root,
                              capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-2000:]
        imported = imported_modules(done.stderr)
        assert "stages.lib.checkpoint" in imported and "torch" not in imported, stage
    assert (root / "metrics/eval.json").is_file()
    check_exports_match_pytorch(root)


# --- the exported folder's own predictor (lib/serve.py), without torch -------------------------

def awkward_images(folder: Path) -> list[Path]:
    """The fixtures' photos and images as people have them: a phone photo turned by its EXIF
    orientation, a 16-bit PNG, a transparent PNG, a tiny one, a panorama, a grey one."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for fixture in sorted(FIXTURES.glob("*.jpg")):
        (folder / fixture.name).write_bytes(fixture.read_bytes())
    photo = Image.open(folder / "ant_0.jpg").convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    photo.save(folder / "phone.jpg", exif=exif, quality=90)
    Image.fromarray(rng.integers(0, 65535, (90, 70), dtype=np.uint16)).save(folder / "wide16.png")
    rgba = rng.integers(0, 255, (60, 80, 4), dtype=np.uint8)
    rgba[..., 3] = np.where(np.arange(80) < 40, 0, 255)
    Image.fromarray(rgba, "RGBA").save(folder / "transparent.png")
    Image.fromarray(rng.integers(0, 255, (9, 13, 3), dtype=np.uint8)).save(folder / "tiny.png")
    photo.resize((900, 120)).save(folder / "panorama.jpg")
    photo.convert("L").save(folder / "grey.jpg")
    return sorted(folder.iterdir())


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_the_folder_prepares_images_exactly_as_the_pipeline_does(tmp_path, interpolation):
    from stages.lib import serve

    for prep in (Preprocessing(224, 256, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), interpolation),
                 Preprocessing(45, 51, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), interpolation)):
        side = {**prep.to_dict()}
        for path in awkward_images(tmp_path / "images"):
            image = load_image(path, prep.resize_size)  # one decoding, shipped as the folder's images.py
            expected = eval_transform(prep)(image).numpy()
            np.testing.assert_allclose(serve.prepare(image, side), expected, atol=2e-6, rtol=0, err_msg=path.name)


@pytest.fixture(scope="session")
def predictor_venv(tmp_path_factory) -> Path:
    """A virtual environment with the exported folder's requirements alone: no torch, no project."""
    from stages.lib.export_folder import PREDICTOR_REQUIREMENTS

    venv = tmp_path_factory.mktemp("predictor") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    done = subprocess.run([str(venv / "bin/python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                           *PREDICTOR_REQUIREMENTS], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return venv / "bin/python"


def set_params(root: Path, section: str = "export", **settings) -> None:
    import yaml

    params = yaml.safe_load((root / "params.yaml").read_text())
    params[section].update(settings)
    (root / "params.yaml").write_text(yaml.safe_dump(params))


def shipped_predictions_go_where_out_says(python: Path, script: Path, image: Path, where: Path) -> None:
    """The folder's predict.py run against each kind of --out: what is left on disk is the CSV where
    it belongs, every link, pipe and device as it was, and no temporary file."""
    def predict(out: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(python), str(script), str(image), "--out", out], capture_output=True, text=True,
                              cwd=where, timeout=120)

    where.mkdir()
    # A link to a regular file: the file is replaced, the link stays.
    (where / "target.csv").write_text("old\n")
    (where / "link.csv").symlink_to(where / "target.csv")
    assert predict("link.csv").returncode == 0
    assert (where / "link.csv").is_symlink() and (where / "target.csv").read_text().startswith("path,predicted")
    # A pipe: written in place, read whole by its reader.
    fifo = where / "pipe"
    os.mkfifo(fifo)
    read = []
    reader = threading.Thread(target=lambda: read.append(fifo.read_text()))
    reader.start()
    assert predict(str(fifo)).returncode == 0
    reader.join(60)
    assert stat.S_ISFIFO(fifo.stat().st_mode) and read[0].startswith("path,predicted")
    # A device, as root too: /dev/null stays the system's node.
    assert predict("/dev/null").returncode == 0 and Path("/dev/null").is_char_device()
    # Standard output
    done = predict("-")
    assert done.returncode == 0 and done.stdout.startswith("path,predicted") and not (where / "-").exists()
    # A missing parent folder is made, as the project's command makes it.
    assert predict("new/deeper/out.csv").returncode == 0
    assert (where / "new/deeper/out.csv").read_text().startswith("path,predicted")
    # A folder and a read-only file: one line naming --out's path, before any image is classified.
    (where / "results").mkdir()
    readonly = where / "kept.csv"
    readonly.write_text("mine\n")
    readonly.chmod(0o444)
    for out, said in (("results", "results: is a folder; give a file name for the CSV, or - for standard output"),
                      ("kept.csv", "kept.csv: is read-only; make it writable (chmod u+w) or give another --out")):
        done = predict(out)
        assert done.returncode == 1 and done.stderr.strip().splitlines() == [f"error: {said}"], done.stderr
    assert readonly.read_text() == "mine\n" and not any((where / "results").iterdir())
    left = sorted(p.relative_to(where).as_posix() for p in where.rglob("*"))
    assert left == ["kept.csv", "link.csv", "new", "new/deeper", "new/deeper/out.csv", "pipe", "results",
                    "target.csv"], left  # no temporary file anywhere


@pytest.mark.slow  # a virtual environment, then the export stages
def test_the_exported_folder_classifies_without_torch_as_pytorch_does(trained_copy, predictor_venv, tmp_path):
    from stages import predict

    root = trained_copy
    set_params(root, int8=False)
    for python_without in ("torch", "stages"):
        assert subprocess.run([str(predictor_venv), "-c", f"import {python_without}"], capture_output=True,
                              cwd=tmp_path).returncode != 0
    model = root / "models/model.safetensors"
    save_checkpoint(model, replace(read_checkpoint(model), temperature=0.6, tta="hflip"))  # both applied
    export_backbone.main()
    export.main()
    shipped = tmp_path / "shipped"  # the folder alone, elsewhere, as `dvc artifacts get` gives it
    shipped.mkdir()
    for name in FOLDER:
        shipped.joinpath(name).write_bytes((root / "models/export" / name).read_bytes())
    images = tmp_path / "to_classify"
    awkward_images(images)
    (images / "broken.jpg").write_bytes(b"not an image")

    done = subprocess.run([str(predictor_venv), str(shipped / "predict.py"), str(images), "--out", "-",
                           "--top-k", "2"], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 1, done.stderr  # one file unreadable
    assert re.fullmatch(r"14 images classified, 1 unreadable, in [\d.]+ s \([\d.]+ images/s\); wrote standard "
                        r"output", done.stderr.strip()), done.stderr
    deployed = pd.read_csv(io.StringIO(done.stdout), keep_default_na=False)
    assert predict.main([str(images), "--out", "torch.csv", "--top-k", "2", "--workers", "0"]) == 1
    pytorch = pd.read_csv(root / "torch.csv", keep_default_na=False)
    assert list(deployed.columns) == list(pytorch.columns) and deployed.path.tolist() == pytorch.path.tolist()
    good = deployed.error == ""
    broken = deployed.error[deployed.path.str.endswith("broken.jpg")].item()
    assert good.sum() == 14 and "UnidentifiedImageError" in broken
    assert deployed.predicted[good].tolist() == pytorch.predicted[good].tolist()
    for column in ("probability", "top1_probability", "top2_probability"):
        np.testing.assert_allclose(deployed[column][good].astype(float), pytorch[column][good].astype(float),
                                   atol=1e-4, rtol=0)
    # The project's own command on the folder runs the same code: the same table
    assert predict.main([str(images), "--out", "onnx.csv", "--top-k", "2", "--engine", "onnx"]) == 1
    assert (root / "onnx.csv").read_text() == done.stdout
    shipped_predictions_go_where_out_says(predictor_venv, shipped / "predict.py", images / "ant_0.jpg",
                                          tmp_path / "outputs")
    # No INT8 model shipped: asking for it is one line naming the file
    done = subprocess.run([str(predictor_venv), str(shipped / "predict.py"), str(images), "--int8"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 1 and done.stderr.strip().splitlines() == [
        f"error: {shipped / 'model.int8.onnx'}: not in the export (INT8 ships only with export.int8 on, and only if "
        "it keeps the fp32 model's test accuracy: model.json's int8 says what was measured)"]


def test_int8_ships_within_its_tolerance_only():
    from stages.lib.quantize import int8_verdict

    assert int8_verdict(0.9, 0.896, 0.005)[0] and int8_verdict(0.9, 0.9, 0.0)[0]
    shipped, why = int8_verdict(0.9, 0.88, 0.005)
    assert not shipped and why == ("INT8 not shipped: its test accuracy 0.8800 is 0.0200 below fp32's 0.9000, more "
                                   "than export.int8_tolerance 0.005; fp32 only")


def constant_backbone(width: int, size: int) -> onnx.ModelProto:
    """An "INT8 backbone" that gives every image the same features: the worst a quantiser could do."""
    from onnx import TensorProto, helper, numpy_helper

    weight, bias = np.zeros((width, 3), np.float32), np.linspace(-1, 1, width, dtype=np.float32)
    nodes = [helper.make_node("GlobalAveragePool", ["image"], ["pooled"]),
             helper.make_node("Flatten", ["pooled"], ["flat"]),
             helper.make_node("Gemm", ["flat", "w", "b"], ["features"], transB=1)]
    graph = helper.make_graph(nodes, "constant",
                              [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, size, size])],
                              [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", width])],
                              [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_int8_is_shipped_only_when_it_keeps_the_test_accuracy(trained_copy, monkeypatch, caplog):
    from stages.lib import serve

    root = trained_copy
    set_params(root, int8_tolerance=1.0)  # whatever INT8 scores: shipped
    export_backbone.main()
    export.main()
    folder = root / "models/export"
    int8 = onnx.load(str(folder / "model.int8.onnx"))
    ops = {node.op_type for node in int8.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops  # really quantised, not a renamed fp32 file
    assert any(init.data_type == onnx.TensorProto.INT8 for init in int8.graph.initializer)
    side = json.loads((folder / "model.json").read_text())
    metrics = json.loads((root / "metrics/export/summary.json").read_text())
    assert side["int8"]["shipped"] and metrics["int8_shipped"] == 1
    assert json.loads((root / "metrics/export.json").read_text())["int8"] == 1  # the headline
    assert metrics["fp32_test_accuracy"] == json.loads((root / "metrics/eval.json").read_text())["accuracy"] \
        if (root / "metrics/eval.json").is_file() else 0 <= metrics["fp32_test_accuracy"] <= 1
    # The folder's predictor scores with it when asked
    images = sorted(FIXTURES.glob("*.jpg"))
    probs, errors = serve.Model(folder, int8=True).classify(images)
    assert not any(errors) and np.allclose(np.stack(probs).sum(1), 1, atol=1e-5)

    # A quantiser that ruins the model (always the first class): not shipped, said in one line
    width = read_checkpoint(root / "models/model.safetensors").head_layers()[0][0].shape[1]
    monkeypatch.setattr(export, "quantize_int8", lambda model, target, name, images: onnx.save(
        constant_backbone(width, side["input_size"]), str(target)))
    set_params(root, int8_tolerance=0.005)
    shutil.rmtree(root / "data/cache/export")  # else the INT8 backbone quantised above is reused
    with caplog.at_level("INFO"):
        export.main()
    assert not (folder / "model.int8.onnx").exists()
    side = json.loads((folder / "model.json").read_text())
    metrics = json.loads((root / "metrics/export/summary.json").read_text())
    assert not side["int8"]["shipped"] and metrics["int8_shipped"] == 0
    assert json.loads((root / "metrics/export.json").read_text())["int8"] == 0
    assert metrics["int8_test_accuracy"] < metrics["fp32_test_accuracy"] - 0.005
    assert [line for line in caplog.text.splitlines() if "INT8 not shipped" in line][0].endswith(
        f"more than export.int8_tolerance 0.005; fp32 only; INT8 agrees with fp32 on "
        f"{metrics['int8_agreement']:.4f} of the test images")
    assert side["int8"]["why"].startswith("INT8 not shipped: its test accuracy")
