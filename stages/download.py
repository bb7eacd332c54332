"""Stage `download`: fetch the image archive named by `data.url` and unpack it into data/raw/.

Before the network it looks for the archive's file name on the project's shelf (data/archives/)
and then in $DATA_MIRROR, so the default pipeline runs offline (lib/fetch.py). The archive is
verified against `data.sha256` when pinned, and unpacked member by member with guards against
path traversal, escaping links and archive bombs (lib/archives.py), into a temporary directory
that is renamed into place.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from stages.lib.archives import unpack, unpack_inner_archives
from stages.lib.cli import run_stage
from stages.lib.fetch import archive_name, obtain_archive, verify_pin
from stages.lib.files import atomic_dir
from stages.lib.params import load_params
from stages.lib.paths import RAW_DIR

log = logging.getLogger("download")


def main() -> None:
    params = load_params().data
    RAW_DIR.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".download.", dir=RAW_DIR.parent) as workdir:
        archive = obtain_archive(params, Path(workdir))
        verify_pin(archive, params.sha256)
        caps = int(params.max_unpacked_mb * 2**20), params.max_members
        with atomic_dir(RAW_DIR) as tmp:
            files = unpack(archive, tmp, archive_name(params.url), *caps)
            files += unpack_inner_archives(tmp, *caps)
    log.info("unpacked %d files into %s", files, RAW_DIR)


if __name__ == "__main__":
    run_stage(main)
