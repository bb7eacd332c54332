"""Stage `download`: fetch the image archive named by `data.url` and unpack it into data/raw/.

Before the network it looks for the archive's file name on the project's shelf (data/archives/)
and then in $DATA_MIRROR, so the default pipeline runs offline. The archive is verified against
`data.sha256` when pinned, and unpacked member by member with guards against path traversal,
escaping links and archive bombs, into a temporary directory that is renamed into place.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
import posixpath
import stat
import tarfile
import tempfile
import time
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Callable, Iterator
from urllib.parse import unquote, urlparse

import requests
from tqdm import tqdm

from stages.cli import UserError, run_stage
from stages.files import atomic_dir
from stages.params import DataParams, load_params
from stages.paths import RAW_DIR

log = logging.getLogger("download")

SHELF_DIR = Path("data/archives")
MIRROR_ENV = "DATA_MIRROR"
CHUNK = 1 << 20


# --- finding the archive ---------------------------------------------------------------------

def archive_name(url: str) -> str:
    name = PurePosixPath(unquote(urlparse(url).path)).name
    if not name:
        raise UserError(f"params.yaml: data.url {url!r} names no file; point it at a .zip, .tar, .tar.gz or .tgz")
    return name


def local_source(url: str) -> Path | None:
    """The file a `file://` URL or a plain path names; None for http(s)."""
    parsed = urlparse(url)
    if parsed.scheme in ("http", "https"):
        return None
    if parsed.scheme == "file":
        path = Path(unquote(parsed.path))
    elif parsed.scheme == "" or len(parsed.scheme) == 1:  # a plain path, or a Windows drive letter
        path = Path(url).expanduser()
    else:
        raise UserError(f"params.yaml: data.url {url!r}: scheme '{parsed.scheme}' is not supported; use http(s)://, file:// or a local path")
    if not path.is_file():
        raise UserError(f"params.yaml: data.url: {path} does not exist; fix the path")
    return path


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


# --- downloading -----------------------------------------------------------------------------

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
            with dest.open("wb") as out, tqdm(total=expected, unit="B", unit_scale=True, desc=archive_name(url), disable=None) as bar:
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


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_pin(path: Path, pin: str | None) -> None:
    if pin is None:
        return
    actual = sha256_of(path)
    if actual != pin:
        raise UserError(
            f"{path}: sha256 {actual} does not match data.sha256 {pin}; "
            "the archive changed or is corrupt: fix data.sha256 or replace the file"
        )


# --- unpacking safely ------------------------------------------------------------------------

@dataclass(frozen=True)
class Member:
    name: str
    size: int
    kind: str  # "file", "dir", "symlink", "hardlink" or "other"
    link_target: str = ""


def safe_relative_path(name: str) -> PurePosixPath:
    """The member's path inside the target, or an error if it is absolute or climbs out."""
    path = PurePosixPath(name.replace("\\", "/"))
    if path.is_absolute() or (path.parts and path.parts[0].endswith(":")):
        raise UserError(f"archive member {name!r} has an absolute path; refusing to unpack this archive")
    if ".." in path.parts:
        raise UserError(f"archive member {name!r} contains '..'; refusing to unpack this archive")
    return path


def check_link(member: Member) -> None:
    """Refuse a link whose target resolves outside the unpack directory."""
    target = member.link_target.replace("\\", "/")
    # A symlink's target is relative to its own folder, a tar hard link's to the archive root.
    base = posixpath.dirname(member.name) if member.kind == "symlink" else ""
    resolved = posixpath.normpath(posixpath.join(base, target))
    if posixpath.isabs(target) or resolved == ".." or resolved.startswith("../"):
        raise UserError(
            f"archive member {member.name!r} is a link to {member.link_target!r}, outside the archive; refusing to unpack"
        )


def zip_members(archive: zipfile.ZipFile) -> Iterator[tuple[Member, Callable[[], IO[bytes]]]]:
    for info in archive.infolist():
        mode = info.external_attr >> 16
        if info.is_dir():
            yield Member(info.filename, 0, "dir"), lambda: None
        elif stat.S_ISLNK(mode):
            yield Member(info.filename, 0, "symlink", archive.read(info).decode("utf-8", "replace")), lambda: None
        else:
            yield Member(info.filename, info.file_size, "file"), lambda info=info: archive.open(info)


def tar_members(archive: tarfile.TarFile) -> Iterator[tuple[Member, Callable[[], IO[bytes]]]]:
    for info in archive:
        if info.isdir():
            kind = "dir"
        elif info.issym():
            kind = "symlink"
        elif info.islnk():
            kind = "hardlink"
        elif info.isfile():
            kind = "file"
        else:
            kind = "other"
        yield Member(info.name, info.size, kind, info.linkname), lambda info=info: archive.extractfile(info)


def open_archive(path: Path, display_name: str):
    lower = display_name.lower()
    if lower.endswith(".zip") or (not lower.endswith((".tar", ".tar.gz", ".tgz")) and zipfile.is_zipfile(path)):
        try:
            archive = zipfile.ZipFile(path)
        except zipfile.BadZipFile as err:
            raise UserError(f"{path}: not a valid zip archive ({err}); replace the file") from None
        return archive, zip_members(archive)
    if lower.endswith((".tar", ".tar.gz", ".tgz")) or tarfile.is_tarfile(path):
        try:
            archive = tarfile.open(path, "r:*")
        except tarfile.TarError as err:
            raise UserError(f"{path}: not a valid tar archive ({err}); replace the file") from None
        return archive, tar_members(archive)
    raise UserError(f"{path}: unsupported archive type; use .zip, .tar, .tar.gz or .tgz")


def unpack(path: Path, dest: Path, display_name: str, max_bytes: int, max_members: int) -> int:
    """Unpack `path` into the empty directory `dest`; returns the number of files written."""
    archive, members = open_archive(path, display_name)
    written_bytes = files = count = 0
    with archive:
        for member, open_member in members:
            count += 1
            if count > max_members:
                raise UserError(
                    f"archive has more than {max_members} members (at {member.name!r}); "
                    "raise data.max_members if it is genuine"
                )
            relative = safe_relative_path(member.name)
            target = dest.joinpath(*relative.parts)
            if member.kind == "dir":
                target.mkdir(parents=True, exist_ok=True)
                continue
            if member.kind in ("symlink", "hardlink"):
                check_link(member)
                # Links are not followed into the dataset: an image is a regular file.
                continue
            if member.kind == "other":
                log.warning("skipping %s: not a regular file", member.name)
                continue
            if written_bytes + member.size > max_bytes:
                raise UserError(
                    f"archive member {member.name!r} takes the unpacked size past data.max_unpacked_mb "
                    f"({max_bytes / 2**20:g} MB); raise the limit if the archive is genuine"
                )
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                with open_member() as src, target.open("wb") as out:
                    # Count what is really written: a member's declared size is only a claim.
                    for chunk in iter(lambda: src.read(CHUNK), b""):
                        written_bytes += len(chunk)
                        if written_bytes > max_bytes:
                            raise UserError(
                                f"archive member {member.name!r} takes the unpacked size past data.max_unpacked_mb "
                                f"({max_bytes / 2**20:g} MB); raise the limit if the archive is genuine"
                            )
                        out.write(chunk)
            except (zipfile.BadZipFile, tarfile.TarError, gzip.BadGzipFile, zlib.error, EOFError) as err:
                raise UserError(f"archive member {member.name!r} is corrupt ({err}); replace the archive") from None
            files += 1
    return files


# --- the stage -------------------------------------------------------------------------------

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


def main() -> None:
    params = load_params().data
    RAW_DIR.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".download.", dir=RAW_DIR.parent) as workdir:
        archive = obtain_archive(params, Path(workdir))
        verify_pin(archive, params.sha256)
        with atomic_dir(RAW_DIR) as tmp:
            files = unpack(
                archive, tmp, archive_name(params.url), int(params.max_unpacked_mb * 2**20), params.max_members
            )
    log.info("unpacked %d files into %s", files, RAW_DIR)


if __name__ == "__main__":
    run_stage(main)
