"""What `data.url` names (a URL, a local archive or a local folder of images), a fingerprint of it
that DVC can watch, and bringing a folder into data/raw/.

DVC sees a stage's inputs only through the files it declares. A local folder named by a param is
not one of them, and declaring `${data.url}` as a dependency would make DVC query the default
https URL on every run, which fails offline. So the `source` stage, which always runs, writes a
fingerprint of the source (every file's path, size and modification time) to data/source.json,
and the download stage depends on that file: a changed folder changes the fingerprint and
download reruns; an unchanged one rewrites the same bytes and nothing does.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import shutil
import stat
from pathlib import Path
from urllib.parse import unquote, urlparse

from stages.lib.cli import UserError
from stages.lib.paths import RAW_DIR

log = logging.getLogger("download")


def local_source(url: str) -> Path | None:
    """The file or folder a `file://` URL or a plain path names (relative to the project); None
    for http(s)."""
    parsed = urlparse(url)
    if parsed.scheme in ("http", "https"):
        return None
    if parsed.scheme == "file":
        path = Path(unquote(parsed.path))
    elif parsed.scheme == "" or len(parsed.scheme) == 1:  # a plain path, or a Windows drive letter
        path = Path(url).expanduser()
    else:
        raise UserError(f"params.yaml: data.url {url!r}: scheme '{parsed.scheme}' is not supported; "
                        "use http(s)://, file:// or a local path")
    if not path.exists():
        raise UserError(f"params.yaml: data.url: {path} does not exist; fix the path")
    if not (path.is_file() or path.is_dir()):
        raise UserError(f"params.yaml: data.url: {path} is neither a file nor a folder; point it at an archive "
                        "or a folder of class folders")
    return path


def folder_entries(folder: Path):
    """(relative path, os.stat_result) of everything under `folder`, sorted, links not followed."""
    for current, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(dirs + files):
            path = Path(current) / name
            if name in dirs and not path.is_symlink():
                continue
            yield path.relative_to(folder).as_posix(), path


def check_pin_applies(path: Path | None, url: str, sha256: str | None) -> None:
    """A sha256 pin names an archive's bytes: refused on the folder `path` (local_source(url))."""
    if sha256 is not None and path is not None and path.is_dir():
        raise UserError(f"params.yaml: data.sha256 pins an archive, but data.url {url} is a folder; "
                        "set data.sha256 to null")


def fingerprint(url: str, sha256: str | None) -> dict:
    """What the download stage's result depends on, read without the network."""
    path = local_source(url)
    check_pin_applies(path, url, sha256)
    if path is None:
        return {"kind": "url", "url": url}
    if path.is_file():
        info = path.stat()
        return {"kind": "file", "path": str(path.resolve()), "bytes": info.st_size, "mtime_ns": info.st_mtime_ns}
    check_not_overlapping(path, RAW_DIR.parent)
    digest, files, total = hashlib.sha256(), 0, 0
    for relative, entry in folder_entries(path):
        info = entry.lstat()
        link = os.readlink(entry) if entry.is_symlink() else ""
        digest.update(f"{relative}\0{info.st_size}\0{info.st_mtime_ns}\0{link}\n".encode("utf-8", "surrogateescape"))
        files += 1
        total += info.st_size
    return {"kind": "folder", "path": str(path.resolve()), "entries": files, "bytes": total,
            "sha256_of_listing": digest.hexdigest()}


def check_not_overlapping(source: Path, data_dir: Path) -> None:
    source, data_dir = source.resolve(), data_dir.resolve()
    if data_dir.is_relative_to(source) or source.is_relative_to(data_dir):
        raise UserError(f"params.yaml: data.url: {source} overlaps the project's data/ folder; "
                        "point it at your images folder, outside data/")


def check_folder_link(entry: Path, relative: str, source: Path) -> None:
    target = Path(os.path.realpath(entry))
    if not target.is_relative_to(source.resolve()):
        raise UserError(f"{source}: {relative} is a link to {os.readlink(entry)}, outside the folder; "
                        "copy the file in, or remove the link")


LINK_FAILURES = (errno.EXDEV, errno.EPERM, errno.EACCES, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP)


def unchanged_copy(previous: Path, info: os.stat_result) -> bool:
    """True if `previous` (the last run's data/raw/ file) is a file of the source's size and
    modification time (copies keep the source's), the test DVC's own state uses for "unchanged"."""
    try:
        old = previous.lstat()
    except FileNotFoundError:
        return False
    return stat.S_ISREG(old.st_mode) and (old.st_size, old.st_mtime_ns) == (info.st_size, info.st_mtime_ns)


def keep_or_copy(src: Path, info: os.stat_result, previous: Path, dest: Path) -> bool:
    """`previous`, linked to `dest`, if it is an unchanged copy of `src` (whose stat is `info`); else a
    copy of `src`.
    True if kept. Never a link to `src` itself: DVC (cache.type hardlink) moves a new output file
    into its cache and makes it read-only, so a link would turn the user's photo into a cache object
    that an edit in place corrupts."""
    if unchanged_copy(previous, info):
        try:
            os.link(previous, dest)
            return True
        except OSError as err:
            if err.errno not in LINK_FAILURES:
                raise
    shutil.copy2(src, dest)
    return False


def bring_folder(source: Path, dest: Path, previous: Path, max_bytes: int, max_files: int) -> tuple[int, int]:
    """Every file under `source` into the empty folder `dest`, under the archives' rules: links
    leading outside refused, links inside not followed, caps on size and count. A file that
    `previous` (the last run's data/raw/, kept by DVC: persist) holds unchanged is linked from there:
    no bytes copied, and DVC knows its inode, so it neither hashes nor caches it again; the rest are
    copied. Returns (kept, copied)."""
    check_not_overlapping(source, dest.parent)
    kept = copied = total = files = 0
    for relative, entry in folder_entries(source):
        if entry.is_symlink():
            check_folder_link(entry, relative, source)
            continue
        if not entry.is_file():
            log.warning("skipping %s: not a regular file", relative)
            continue
        files += 1
        if files > max_files:
            raise UserError(f"{source}: more than {max_files} files (at {relative}); "
                            "raise data.max_members if the folder is genuine")
        info = entry.stat()
        total += info.st_size
        if total > max_bytes:
            raise UserError(f"{source}: {relative} takes the size past data.max_unpacked_mb "
                            f"({max_bytes / 2**20:g} MB); raise the limit if the folder is genuine")
        target = dest / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        if keep_or_copy(entry, info, previous / relative, target):
            kept += 1
        else:
            copied += 1
    return kept, copied
