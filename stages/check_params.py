"""Stage `check_params`: validate the whole params.yaml before any other stage runs.

DVC deletes a stage's outputs before it runs the stage's command, so a stage that finds a bad
param itself has already cost the user its outputs. This stage comes first instead: it depends on
every param, refuses a bad params.yaml with one line (unknown keys at any level, wrong types,
values out of range, missing keys: lib/params.py), and otherwise writes each key's value to
data/params/KEY.json: every top-level key (`train.json`) and every key of a section
(`train.lr.json`). A stage that declares params `train` and `model.backbone` depends on
data/params/train.json and data/params/model.backbone.json, so DVC reaches it only after this
check passed, and a changed param rewrites only its own files with new bytes: nothing else reruns.
"""

from __future__ import annotations

import json
import logging

import yaml

from stages.lib.cli import run_stage
from stages.lib.files import atomic_dir
from stages.lib.params import load_params
from stages.lib.paths import PARAMS_FILE, STAGE_PARAMS_DIR

log = logging.getLogger("check_params")


def key_files(raw: dict) -> dict[str, object]:
    """Every top-level key and every key of a section, by its dotted name, with its value."""
    keys = {}
    for name, value in raw.items():
        keys[name] = value
        if isinstance(value, dict):
            keys.update({f"{name}.{key}": inner for key, inner in value.items()})
    return keys


def main() -> None:
    load_params()  # the one-line error for any bad param, before anything else
    raw = yaml.safe_load(PARAMS_FILE.read_text(encoding="utf-8"))
    with atomic_dir(STAGE_PARAMS_DIR) as tmp:
        for key, value in key_files(raw).items():
            (tmp / f"{key}.json").write_text(json.dumps(value, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    log.info("%s is valid", PARAMS_FILE)


if __name__ == "__main__":
    run_stage(main)
