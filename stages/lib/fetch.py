"""Getting the dataset archive: a local file, the project's shelf, $DATA_MIRROR, or a download.

The shelf (data/archives/) and the mirror are looked in before the network, so the default
pipeline runs offline. Downloads stream with a progress bar, time out, and retry transient
failures with exponential backoff; a sha256 pin catches a changed or corrupt archive.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path, PurePosixPath
from urllib.parse import unquote, urlparse

import requests
from tqdm import tqdm

from stages.lib.cli import UserError
from stages.lib.files import file_sha256
from stages.lib.params import DataParams
from stages.lib.paths import SHELF_DIR
from stages.lib.sources import local_source

log = logging.getLogger("download")

MIRROR_ENV = "DATA_MIRROR"
CHUNK = 1 << 20


def archive_name(url: str) -> str:
    name = PurePosixPath(unquote(urlparse(url).path)).name
    if not name:
        raise UserError(f"params.yaml: data.url {url!r} names no file; point it at a .zip, .tar, .tar.gz or .tgz")
    return name


def offline_copy(name: str) -> Path | None:
    """The archive on the project's shelf, else in $DATA_MIRROR, else None."""
    places = [SHELF_DIR]
    if os.environ.get(MIRROR_ENV):
        places.append(Path(os.environ[MIRROR_ENV]))
    for place in places:
        candidate = place / name
        if candidate.is_file():
            return candidate
    return None


class Retryable(Exception):
    """A failure worth another try: a 5xx, a timeout, a dropped connection."""


def fetch_once(url: str, dest: Path, timeout: float) -> None:
    try:
        with requests.get(url, stream=True, timeout=(timeout, timeout)) as response:
            if response.status_code >= 500:
                raise Retryable(f"HTTP {response.status_code}")
            if response.status_code >= 400:
                raise UserError(f"download of {url} failed: HTTP {response.status_code}; check data.url")
            expected = int(response.headers.get("Content-Length", 0)) or None
            received = 0
            progress = tqdm(total=expected, unit="B", unit_scale=True, desc=archive_name(url), disable=None)
            with dest.open("wb") as out, progress as bar:
                for chunk in response.iter_content(CHUNK):
                    out.write(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
            if expected is not None and received != expected:
                raise Retryable(f"connection closed after {received} of {expected} bytes")
    except (requests.ConnectionError, requests.Timeout) as err:
        raise Retryable(f"{type(err).__name__}: {err}") from err
    except requests.exceptions.ChunkedEncodingError as err:
        raise Retryable(f"connection dropped mid-body: {err}") from err


def download(url: str, dest: Path, timeout: float, retries: int, backoff: float) -> None:
    """Fetch `url` to `dest`, retrying transient failures with exponential backoff."""
    for attempt in range(retries + 1):
        try:
            fetch_once(url, dest, timeout)
            return
        except Retryable as err:
            if attempt == retries:
                raise UserError(
                    f"download of {url} failed after {retries + 1} attempts ({err}); "
                    f"check the network, or put the archive in {SHELF_DIR}/ or ${MIRROR_ENV}"
                ) from None
            delay = backoff * 2**attempt
            log.warning("attempt %d of %d failed (%s); retrying in %.1f s", attempt + 1, retries + 1, err, delay)
            time.sleep(delay)


def verify_pin(path: Path, pin: str | None) -> None:
    if pin is None:
        return
    actual = file_sha256(path)
    if actual != pin:
        raise UserError(
            f"{path}: sha256 {actual} does not match data.sha256 {pin}; "
            "the archive changed or is corrupt: fix data.sha256 or replace the file"
        )


def obtain_archive(params: DataParams, workdir: Path) -> Path:
    """A local path to the archive: the given file, an offline copy, or a fresh download."""
    local = local_source(params.url)
    if local is not None:
        log.info("using local archive %s", local)
        return local
    name = archive_name(params.url)
    copy = offline_copy(name)
    if copy is not None:
        log.info("using offline copy %s instead of downloading %s", copy, params.url)
        return copy
    dest = workdir / name
    log.info("downloading %s", params.url)
    download(params.url, dest, params.timeout, params.retries, params.retry_backoff)
    return dest
