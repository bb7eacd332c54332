"""After `make run` in CI: did the pipeline reproduce what is committed?

The params check and the data stages (check, download, index, weights) must reproduce byte for byte: their dvc.lock
entries and metrics/index/summary.json equal the committed ones. The model is trained with floating-point kernels
that differ between CPUs in the last bits, so its test accuracy is checked against a floor and
a tolerance instead (docs/scaling.md, CI).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import yaml

EXACT_STAGES = ("check", "download", "index", "weights")
ACCURACY_FLOOR = 0.93
ACCURACY_TOLERANCE = 0.02  # three of the 153 test images


def committed(path: str) -> str:
    return subprocess.run(["git", "show", f"HEAD:{path}"], check=True, capture_output=True, text=True).stdout


def main() -> int:
    failures = []
    then, now = yaml.safe_load(committed("dvc.lock"))["stages"], yaml.safe_load(open("dvc.lock"))["stages"]
    for stage in EXACT_STAGES:
        if then.get(stage) != now.get(stage):
            failures.append(f"stage {stage}: dvc.lock entry differs from the committed one (git diff dvc.lock)")
    if json.loads(committed("metrics/index/summary.json")) != json.load(open("metrics/index/summary.json")):
        failures.append("metrics/index/summary.json differs from the committed one")
    expected = json.loads(committed("metrics/eval.json"))["accuracy"]
    accuracy = json.load(open("metrics/eval.json"))["accuracy"]
    print(f"test accuracy {accuracy:.4f} (committed {expected:.4f}, floor {ACCURACY_FLOOR}, "
          f"tolerance {ACCURACY_TOLERANCE})")
    if accuracy < ACCURACY_FLOOR:
        failures.append(f"test accuracy {accuracy:.4f} is below {ACCURACY_FLOOR}")
    if abs(accuracy - expected) > ACCURACY_TOLERANCE:
        failures.append(f"test accuracy {accuracy:.4f} is more than {ACCURACY_TOLERANCE} away from the committed "
                        f"{expected:.4f}")
    # `make run` runs every pipeline: the release's exported folder and the audit's suspects are there,
    # and they name the model and the index of this run.
    model_md5 = hashlib.md5(open("models/model.safetensors", "rb").read()).hexdigest()
    for path in ("models/export/model.onnx", "models/export/predict.py", "metrics/suspects/suspects.csv"):
        if not os.path.isfile(path):
            failures.append(f"{path}: missing after make run (release/dvc.yaml, audit/dvc.yaml)")
    if json.load(open("metrics/export.json")).get("md5") != model_md5[:7]:
        failures.append("metrics/export.json: names another model than models/model.safetensors")
    print(f"exported folder: {sorted(os.listdir('models/export'))}")
    for failure in failures:
        print(f"ci: {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
