"""Stage `check`: validate params.yaml and fingerprint the data source, before any other stage runs.

DVC deletes a stage's outputs before it runs the stage's command, so a stage that finds a bad
param itself has already cost the user its outputs. This stage comes first instead, and always
runs (`always_changed` in dvc.yaml, well under a second: no torch, no network):
- it refuses a bad params.yaml with one line (unknown keys at any level, wrong types, values out of
  range, missing keys: lib/params.py), and a data.url that names nothing;
- it writes data/params.ok, whose bytes never change. Every other stage depends on it, so DVC
  reaches none of them when the check fails; which param reruns which stage is DVC's own
  `params:` tracking, each param declared once in dvc.yaml;
- it writes data/source.json, a fingerprint of what data.url names (for a local folder every
  file's path, size and modification time), which changes only when the source does: download
  depends on it, so a photo added to a source folder reruns download and what follows.
"""

from __future__ import annotations

import logging

from stages.lib.cli import run_stage
from stages.lib.files import write_json_atomic, write_text_atomic
from stages.lib.params import load_params
from stages.lib.paths import PARAMS_FILE, PARAMS_OK, SOURCE_JSON
from stages.lib.sources import fingerprint

log = logging.getLogger("check")


def main() -> None:
    params = load_params()
    found = fingerprint(params.data.url, params.data.sha256)
    write_json_atomic(SOURCE_JSON, found)
    write_text_atomic(PARAMS_OK, f"{PARAMS_FILE} is valid\n")
    if found["kind"] == "folder":
        log.info("%s: %d entries, %.1f MB", found["path"], found["entries"], found["bytes"] / 2**20)


if __name__ == "__main__":
    run_stage(main)
