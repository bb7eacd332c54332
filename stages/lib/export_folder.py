"""The exported folder's predictor: the files that make models/export/ classify images with
onnxruntime, numpy and pillow alone (no torch, no project)."""

from __future__ import annotations

from pathlib import Path

from stages.lib import images, serve

# predict.py is lib/serve.py; images.py, the pipeline's decoding, which it imports
PREDICTOR_FILES = {"predict.py": Path(serve.__file__), "images.py": Path(images.__file__)}
PREDICTOR_REQUIREMENTS = ["onnxruntime>=1.18", "numpy>=1.24", "pillow>=10.0"]
FOLDER_README = """# An exported image classifier

Runs with onnxruntime, numpy and pillow alone (no torch):

    pip install -r requirements.txt
    python predict.py PATH... --out predictions.csv

PATHs are image files or folders. Options: --top-k K, --min-confidence P (answer `unknown` below
it), --out - (standard output), --int8 (where model.int8.onnx was shipped). model.json holds the
classes, the preprocessing and the input and output names, for calling model.onnx from elsewhere.
"""


def write_predictor(folder: Path) -> None:
    """predict.py, the images.py it decodes with, requirements.txt and README.md in `folder`."""
    for name, source in PREDICTOR_FILES.items():
        (folder / name).write_bytes(source.read_bytes())
    (folder / "requirements.txt").write_text("\n".join(PREDICTOR_REQUIREMENTS) + "\n", encoding="utf-8")
    (folder / "README.md").write_text(FOLDER_README, encoding="utf-8")
