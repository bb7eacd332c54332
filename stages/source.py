"""Stage `source`: a fingerprint of what `data.url` names, so that DVC sees a change in it.

It always runs (`always_changed` in dvc.yaml) and takes well under a second: no network, no
torch. For a local folder it records every file's path, size and modification time; for a local
archive its size and modification time; for a URL the URL (the pin in data.sha256 guards its
content). Download depends on data/source.json, so it reruns exactly when the source changed
(lib/sources.py explains why not `${data.url}` as a dependency).
"""

from __future__ import annotations

import logging

from stages.lib.cli import run_stage
from stages.lib.files import write_json_atomic
from stages.lib.params import load_params
from stages.lib.paths import SOURCE_JSON
from stages.lib.sources import fingerprint

log = logging.getLogger("source")


def main() -> None:
    params = load_params().data
    found = fingerprint(params.url, params.sha256)
    write_json_atomic(SOURCE_JSON, found)
    if found["kind"] == "folder":
        log.info("%s: %d entries, %.1f MB", found["path"], found["entries"], found["bytes"] / 2**20)


if __name__ == "__main__":
    run_stage(main)
