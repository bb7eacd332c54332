"""Unpacking an archive safely: no absolute paths, no '..', no links leading outside, and caps
on the unpacked size (counted on the bytes really written) and on the number of members."""

from __future__ import annotations

import gzip
import logging
import posixpath
import stat
import tarfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Callable, Iterator

from stages.lib.cli import UserError

log = logging.getLogger("download")

CHUNK = 1 << 20
ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz")


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
            f"archive member {member.name!r} is a link to {member.link_target!r}, outside the archive; "
            "refusing to unpack"
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


def without_archive_suffix(name: str) -> str:
    for suffix in sorted(ARCHIVE_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def unpack_inner_archives(folder: Path, max_bytes: int, max_members: int) -> int:
    """Archives inside the unpacked archive (one level: not those inside them), each unpacked
    under the same rules into a folder named after it, which replaces it. Returns the files written."""
    files = 0
    inner = sorted(p for p in folder.rglob("*") if p.is_file() and p.name.lower().endswith(ARCHIVE_SUFFIXES)
                   and not p.name.startswith("."))
    for archive in inner:
        target = archive.with_name(without_archive_suffix(archive.name))
        if target.exists():
            target = archive.with_name(archive.name + ".unpacked")
        target.mkdir()
        written = unpack(archive, target, archive.name, max_bytes, max_members)
        archive.unlink()
        log.info("unpacked the inner archive %s: %d files", archive.relative_to(folder), written)
        files += written
    return files
