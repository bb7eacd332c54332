"""Stage `download`: bring what `data.url` names into data/raw/: a folder of images, or an archive.

A local folder is copied in file by file, except the files the last run's data/raw/ (a persistent
output) holds unchanged, which are kept (lib/sources.py). An archive is looked for by its file name
on the project's shelf (data/archives/) and then in $DATA_MIRROR before the network, so the default
pipeline runs offline (lib/fetch.py); it is verified against `data.sha256` when pinned, and
unpacked member by member with guards against path traversal, escaping links and archive bombs
(lib/archives.py). Either way archives found inside are unpacked one level deep, and the result is
built in a temporary directory that is renamed into place.
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
from stages.lib.sources import bring_folder, check_pin_applies, local_source

log = logging.getLogger("download")


def main() -> None:
    params = load_params().data
    caps = int(params.max_unpacked_mb * 2**20), params.max_members
    RAW_DIR.parent.mkdir(parents=True, exist_ok=True)
    source = local_source(params.url)
    if source is not None and source.is_dir():
        check_pin_applies(source, params.url, params.sha256)
        with atomic_dir(RAW_DIR) as tmp:
            kept, copied = bring_folder(source, tmp, RAW_DIR, *caps)
            inner = unpack_inner_archives(tmp, *caps)
        log.info("brought %d files from %s into %s: %d unchanged since the last run (kept, not copied), %d "
                 "copied%s", kept + copied, source, RAW_DIR, kept, copied,
                 f"; {inner} files unpacked from archives inside it" if inner else "")
        return
    with tempfile.TemporaryDirectory(prefix=".download.", dir=RAW_DIR.parent) as workdir:
        archive = obtain_archive(params, Path(workdir))
        verify_pin(archive, params.sha256)
        with atomic_dir(RAW_DIR) as tmp:
            files = unpack(archive, tmp, archive_name(params.url), *caps)
            files += unpack_inner_archives(tmp, *caps)
    log.info("unpacked %d files into %s", files, RAW_DIR)


if __name__ == "__main__":
    run_stage(main)
