"""Stage `download`: fetching over real HTTP on 127.0.0.1, offline copies, pins and safe unpacking."""

from __future__ import annotations

import hashlib
import io
import json
import stat
import tarfile
import threading
import time
import zipfile
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from stages import download
from stages.lib.cli import UserError
from tests.conftest import make_image_tree, zip_tree

FAST_RETRIES = {"retries": 2, "retry_backoff": 0.01, "timeout": 5}


@pytest.fixture
def tiny_zip(tmp_path_factory) -> Path:
    source = tmp_path_factory.mktemp("tree")
    make_image_tree(source / "tiny" / "train", {"cats": 2, "dogs": 2})
    return zip_tree(source, tmp_path_factory.mktemp("zip") / "tiny.zip")


@pytest.fixture
def server(tiny_zip):
    """An HTTP server whose first path segment picks a behaviour; it counts requests per path."""
    body = tiny_zip.read_bytes()
    hits: Counter[str] = Counter()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def send_body(self, data: bytes, declared: int | None = None) -> None:
            self.send_response(200)
            self.send_header("Content-Length", str(declared or len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            hits[self.path] += 1
            behaviour, n = self.path.split("/")[1], hits[self.path]
            if behaviour == "ok":
                self.send_body(body)
            elif behaviour == "missing":
                self.send_error(404)
            elif behaviour == "flaky" and n == 1:
                self.send_error(500)
            elif behaviour == "flaky":
                self.send_body(body)
            elif behaviour == "drop" and n == 1 or behaviour == "always-drop":
                # Promise the whole body, send half, hang up.
                self.send_body(body[: len(body) // 2], declared=len(body))
                self.close_connection = True
            elif behaviour == "drop":
                self.send_body(body)
            elif behaviour == "slow":
                time.sleep(3)
                self.send_body(body)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    httpd.base = f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.hits = hits
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def leftovers(root: Path) -> list[str]:
    """Temporary files or folders a stage left in data/."""
    data = root / "data"
    return sorted(p.name for p in data.iterdir() if p.name.startswith(".")) if data.exists() else []


def unpacked(root: Path) -> list[str]:
    return sorted(p.relative_to(root / "data/raw").as_posix() for p in (root / "data/raw").rglob("*") if p.is_file())


def run_download(project, **data_overrides) -> Path:
    root = project(data={"sha256": None, **FAST_RETRIES, **data_overrides})
    download.main()
    return root


def test_http_download_unpacks(project, server):
    root = run_download(project, url=f"{server.base}/ok/tiny.zip")
    assert unpacked(root) == [f"tiny/train/{c}/img_{i:04d}.png" for c, i in
                              [("cats", 0), ("cats", 1), ("dogs", 2), ("dogs", 3)]]
    assert leftovers(root) == []


def test_http_404_fails_at_once_and_writes_nothing(project, server):
    with pytest.raises(UserError, match=r"HTTP 404; check data.url"):
        run_download(project, url=f"{server.base}/missing/tiny.zip")
    assert server.hits["/missing/tiny.zip"] == 1
    assert not Path("data/raw").exists() and leftovers(Path.cwd()) == []


def test_http_500_then_success_retries(project, server):
    root = run_download(project, url=f"{server.base}/flaky/tiny.zip")
    assert server.hits["/flaky/tiny.zip"] == 2
    assert len(unpacked(root)) == 4


def test_connection_dropped_mid_body_is_retried(project, server):
    root = run_download(project, url=f"{server.base}/drop/tiny.zip")
    assert server.hits["/drop/tiny.zip"] == 2
    assert len(unpacked(root)) == 4


def test_connection_always_dropped_gives_up(project, server):
    with pytest.raises(UserError, match=r"failed after 3 attempts \(.*(dropped|closed)"):
        run_download(project, url=f"{server.base}/always-drop/tiny.zip")
    assert server.hits["/always-drop/tiny.zip"] == 3
    assert not Path("data/raw").exists() and leftovers(Path.cwd()) == []


def test_server_slower_than_timeout_fails(project, server):
    started = time.monotonic()
    with pytest.raises(UserError, match=r"failed after 1 attempts \(.*(Timeout|timed out)"):
        run_download(project, url=f"{server.base}/slow/tiny.zip", timeout=0.3, retries=0)
    assert time.monotonic() - started < 2.5
    assert not Path("data/raw").exists()


def test_wrong_pin_fails_and_keeps_old_raw(project, server):
    root = project()
    (root / "data/raw").mkdir(parents=True)
    (root / "data/raw/old.txt").write_text("previous run")
    with pytest.raises(UserError, match=r"does not match data.sha256 0{64}; .*fix data.sha256"):
        run_download(project, url=f"{server.base}/ok/tiny.zip", sha256="0" * 64)
    assert unpacked(root) == ["old.txt"]
    assert leftovers(root) == []


def test_right_pin_passes(project, server, tiny_zip):
    pin = hashlib.sha256(tiny_zip.read_bytes()).hexdigest()
    root = run_download(project, url=f"{server.base}/ok/tiny.zip", sha256=pin)
    assert len(unpacked(root)) == 4


def test_shelf_comes_before_mirror_and_network(project, tiny_zip, tmp_path_factory, monkeypatch, caplog):
    root = project()
    shelf = root / "data/archives"
    shelf.mkdir(parents=True)
    (shelf / "tiny.zip").write_bytes(tiny_zip.read_bytes())
    mirror = tmp_path_factory.mktemp("mirror")
    (mirror / "tiny.zip").write_bytes(b"not even an archive")
    monkeypatch.setenv("DATA_MIRROR", str(mirror))
    caplog.set_level("INFO")
    # Port 9 on loopback: nothing listens, so any network attempt would fail.
    run_download(project, url="http://127.0.0.1:9/somewhere/tiny.zip")
    assert "using offline copy data/archives/tiny.zip" in caplog.text
    assert len(unpacked(root)) == 4


def test_mirror_is_used_when_shelf_lacks_the_file(project, tiny_zip, monkeypatch, caplog):
    monkeypatch.setenv("DATA_MIRROR", str(tiny_zip.parent))
    caplog.set_level("INFO")
    root = run_download(project, url="https://example.invalid/data/tiny.zip")
    assert f"using offline copy {tiny_zip}" in caplog.text
    assert len(unpacked(root)) == 4


@pytest.mark.parametrize("form", ["file-url", "path"])
def test_local_archives(project, tiny_zip, form):
    url = tiny_zip.as_uri() if form == "file-url" else str(tiny_zip)
    assert len(unpacked(run_download(project, url=url))) == 4


def test_missing_local_archive(project, tmp_path):
    with pytest.raises(UserError, match=r"does not exist; fix the path"):
        run_download(project, url=str(tmp_path / "nope.zip"))


@pytest.mark.parametrize("suffix, mode", [(".tar", "w"), (".tar.gz", "w:gz"), (".tgz", "w:gz")])
def test_tar_archives(project, tmp_path_factory, suffix, mode):
    source = tmp_path_factory.mktemp("tree")
    make_image_tree(source / "tiny", {"a": 1, "b": 2})
    archive = tmp_path_factory.mktemp("tar") / f"tiny{suffix}"
    with tarfile.open(archive, mode) as tar:
        tar.add(source / "tiny", arcname="tiny")
    root = run_download(project, url=str(archive))
    assert unpacked(root) == ["tiny/a/img_0000.png", "tiny/b/img_0001.png", "tiny/b/img_0002.png"]


# --- malicious archives ------------------------------------------------------------------------

def zip_with(tmp_path: Path, entries: list[tuple[zipfile.ZipInfo | str, bytes]]) -> Path:
    path = tmp_path / "evil.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for info, data in entries:
            archive.writestr(info, data)
    return path


def zip_symlink(name: str, target: str) -> tuple[zipfile.ZipInfo, bytes]:
    info = zipfile.ZipInfo(name)
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info, target.encode()


def tar_with_symlink(tmp_path: Path, name: str, target: str) -> Path:
    path = tmp_path / "evil.tar"
    with tarfile.open(path, "w") as tar:
        link = tarfile.TarInfo(name)
        link.type, link.linkname = tarfile.SYMTYPE, target
        tar.addfile(link)
        data = b"payload"
        info = tarfile.TarInfo("ok/file.txt")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return path


@pytest.mark.parametrize(
    "entries, message",
    [
        ([("ok/a.txt", b"a"), ("../evil.txt", b"x")], r"member '\.\./evil\.txt' contains '\.\.'"),
        ([("ok/../../evil.txt", b"x")], r"member 'ok/\.\./\.\./evil\.txt' contains '\.\.'"),
        ([("/etc/evil.txt", b"x")], r"member '/etc/evil\.txt' has an absolute path"),
        ([zip_symlink("ok/link", "../../etc/passwd")],
         r"member 'ok/link' is a link to '\.\./\.\./etc/passwd', outside"),
        ([zip_symlink("ok/link", "/etc/passwd")], r"member 'ok/link' is a link to '/etc/passwd', outside"),
    ],
)
def test_zip_escapes_are_refused(project, tmp_path, entries, message):
    archive = zip_with(tmp_path, entries)
    with pytest.raises(UserError, match=message):
        run_download(project, url=str(archive))
    assert not Path("data/raw").exists() and leftovers(Path.cwd()) == []
    assert not (tmp_path / "evil.txt").exists()


def test_tar_symlink_escape_is_refused(project, tmp_path):
    archive = tar_with_symlink(tmp_path, "ok/link", "../../../etc/passwd")
    with pytest.raises(UserError, match=r"member 'ok/link' is a link to '\.\./\.\./\.\./etc/passwd', outside"):
        run_download(project, url=str(archive))
    assert not Path("data/raw").exists() and leftovers(Path.cwd()) == []


def test_link_inside_the_archive_is_allowed_but_not_unpacked(project, tmp_path):
    archive = tar_with_symlink(tmp_path, "ok/link", "file.txt")
    assert unpacked(run_download(project, url=str(archive))) == ["ok/file.txt"]


def test_zip_bomb_over_the_cap_is_refused(project, tmp_path):
    archive = zip_with(tmp_path, [("ok/small.bin", b"1"), ("ok/bomb.bin", bytes(3 * 2**20))])
    assert archive.stat().st_size < 20_000
    message = r"member 'ok/bomb.bin' takes the unpacked size past data.max_unpacked_mb \(1 MB\)"
    with pytest.raises(UserError, match=message):
        run_download(project, url=str(archive), max_unpacked_mb=1)
    assert not Path("data/raw").exists() and leftovers(Path.cwd()) == []


def test_lying_zip_header_is_caught_while_writing(project, tmp_path):
    """A member whose header claims a small size cannot write past the cap."""
    archive = zip_with(tmp_path, [("ok/bomb.bin", bytes(3 * 2**20))])
    data = bytearray(archive.read_bytes())
    # Patch the declared uncompressed size (local header and central directory) to 10 bytes.
    for signature, offset in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):
        at = data.find(signature) + offset
        data[at:at + 4] = (10).to_bytes(4, "little")
    archive.write_bytes(bytes(data))
    # zipfile stops at the declared size, and the CRC then gives the lie away.
    with pytest.raises(UserError, match=r"member 'ok/bomb.bin' is corrupt \(Bad CRC-32"):
        run_download(project, url=str(archive), max_unpacked_mb=1)
    assert not Path("data/raw").exists() and leftovers(Path.cwd()) == []


def test_too_many_members_is_refused(project, tmp_path):
    archive = zip_with(tmp_path, [(f"ok/{i}.txt", b"x") for i in range(6)])
    with pytest.raises(UserError, match=r"more than 5 members \(at 'ok/5.txt'\); raise data.max_members"):
        run_download(project, url=str(archive), max_members=5)
    assert not Path("data/raw").exists()


def test_an_inner_archive_is_unpacked_one_level_under_the_same_rules(project, tmp_path):
    from stages import index

    photos = tmp_path / "photos"
    make_image_tree(photos / "cats_and_dogs", {"cat": 6, "dog": 6})
    outer = tmp_path / "outer"
    outer.mkdir()
    zip_tree(photos, outer / "photos.zip")  # a zip inside the zip, as many downloads come
    root = run_download(project, url=str(zip_tree(outer, tmp_path / "download.zip")), sha256=None)
    assert unpacked(root)[0].startswith("photos/cats_and_dogs/cat/") and len(unpacked(root)) == 12
    index.main()
    assert json.loads((root / "metrics/data.json").read_text())["images"] == 12


def test_an_archive_nested_deeper_is_named_in_the_error(project, tmp_path):
    from stages import index

    photos = tmp_path / "photos"
    make_image_tree(photos / "cat_and_dog", {"cat": 6, "dog": 6})
    level1, level2 = tmp_path / "level1", tmp_path / "level2"
    level1.mkdir()
    level2.mkdir()
    zip_tree(photos, level1 / "deepest.zip")
    zip_tree(level1, level2 / "middle.zip")
    root = run_download(project, url=str(zip_tree(level2, tmp_path / "download.zip")), sha256=None)
    assert unpacked(root) == ["middle/deepest.zip"]
    with pytest.raises(UserError, match=r"no class folders, only the archive\(s\) middle/deepest.zip, nested more than "
                                        r"one level deep; unpack them"):
        index.main()


def test_an_inner_archive_escaping_the_folder_is_refused(project, tmp_path):
    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as archive:
        archive.writestr("../../outside.txt", "x")
    outer = tmp_path / "outer"
    outer.mkdir()
    (outer / "evil.zip").write_bytes(evil.read_bytes())
    with pytest.raises(UserError, match=r"archive member '../../outside.txt' contains '..'"):
        run_download(project, url=str(zip_tree(outer, tmp_path / "download.zip")), sha256=None)
    assert not (project().parent / "outside.txt").exists()


# --- a local folder as the source ------------------------------------------------------------


def test_a_folder_is_copied_in_with_its_inner_archives_and_the_next_run_keeps_what_did_not_change(
        project, tmp_path, caplog):
    import os

    photos = tmp_path / "my_photos"
    make_image_tree(photos, {"cat": 2, "dog": 2})
    make_image_tree(tmp_path / "more", {"bird": 2}, start=10)
    zip_tree(tmp_path / "more", photos / "birds.zip")
    caplog.set_level("INFO")
    root = run_download(project, url="my_photos")  # relative to the project
    assert unpacked(root) == ["birds/bird/img_0010.png", "birds/bird/img_0011.png", "cat/img_0000.png",
                              "cat/img_0001.png", "dog/img_0002.png", "dog/img_0003.png"]
    original, brought = photos / "cat/img_0000.png", root / "data/raw/cat/img_0000.png"
    # a copy, never a link to the user's photo: DVC's cache would adopt it (and make it read-only)
    assert brought.read_bytes() == original.read_bytes() and brought.stat().st_ino != original.stat().st_ino
    assert original.stat().st_nlink == 1
    assert (photos / "birds.zip").is_file()  # the user's inner archive stays where it was
    assert "0 unchanged since the last run (kept, not copied), 5 copied; 2 files unpacked" in caplog.text
    inodes = {path.name: path.stat().st_ino for path in (root / "data/raw").rglob("*.png")}

    # One photo added, one edited (new size and time), one removed: the rest are the same files.
    make_image_tree(photos, {"cat": 1}, start=20)
    edited = photos / "dog/img_0002.png"
    edited.write_bytes(edited.read_bytes() + b"\0")
    os.utime(edited, ns=(edited.stat().st_atime_ns, edited.stat().st_mtime_ns + 10**9))
    (photos / "dog/img_0003.png").unlink()
    caplog.clear()
    download.main()
    after = {path.name: path.stat().st_ino for path in (root / "data/raw").rglob("*.png")}
    assert sorted(after) == ["img_0000.png", "img_0001.png", "img_0002.png", "img_0010.png", "img_0011.png",
                             "img_0020.png"]
    assert all(after[name] == inodes[name] for name in ("img_0000.png", "img_0001.png"))  # kept
    assert after["img_0002.png"] != inodes["img_0002.png"]
    assert (root / "data/raw/dog/img_0002.png").read_bytes() == edited.read_bytes()
    # the inner archive's files are unpacked anew (birds.zip is copied, not kept: unpacking removed it)
    assert "2 unchanged since the last run (kept, not copied), 3 copied" in caplog.text
    assert leftovers(root) == []


def test_a_folder_where_links_fail_is_copied_whole(project, tmp_path, monkeypatch, caplog):
    import errno
    import os

    make_image_tree(tmp_path / "photos", {"cat": 1, "dog": 1})
    root = run_download(project, url=str(tmp_path / "photos"))

    def cross_device(src, dst):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", cross_device)
    caplog.set_level("INFO")
    download.main()
    assert (root / "data/raw/cat/img_0000.png").read_bytes() == (tmp_path / "photos/cat/img_0000.png").read_bytes()
    assert "0 unchanged since the last run (kept, not copied), 2 copied" in caplog.text


def test_a_folder_follows_the_archive_rules(project, tmp_path):
    import os

    photos = tmp_path / "photos"
    make_image_tree(photos, {"cat": 3, "dog": 3})
    os.symlink(photos / "cat/img_0000.png", photos / "dog/inside.png")
    root = run_download(project, url=str(photos))
    assert "dog/inside.png" not in unpacked(root)  # a link inside the folder is not followed
    (tmp_path / "secret.txt").write_text("x")
    os.symlink(tmp_path / "secret.txt", photos / "cat/outside.png")
    with pytest.raises(UserError, match=r"photos: cat/outside.png is a link to .*secret.txt, outside the folder"):
        run_download(project, url=str(photos))
    os.remove(photos / "cat/outside.png")
    with pytest.raises(UserError, match=r"photos: more than 5 files \(at dog/img_0005.png\); raise data.max_members"):
        run_download(project, url=str(photos), max_members=5)
    with pytest.raises(UserError, match=r"takes the size past data.max_unpacked_mb"):
        run_download(project, url=str(photos), max_unpacked_mb=0.0001)
    assert len(unpacked(root)) == 6 and leftovers(root) == []  # the failed runs left the earlier result alone


def test_a_folder_cannot_be_pinned_nor_overlap_the_project_data(project, tmp_path):
    from stages import check

    make_image_tree(tmp_path / "photos", {"cat": 1, "dog": 1})
    project(data={"url": str(tmp_path / "photos")})  # the default sha256 pin stays
    with pytest.raises(UserError, match=r"^params.yaml: data.sha256 pins an archive, but data.url .*photos is a "
                                        r"folder; set data.sha256 to null$"):
        check.main()
    for url in (".", "data", "data/raw/x"):
        (tmp_path / "data/raw/x").mkdir(parents=True, exist_ok=True)
        project(data={"url": url, "sha256": None})
        with pytest.raises(UserError, match=r"overlaps the project's data/ folder; point it at your images folder"):
            check.main()


def test_the_source_fingerprint_changes_with_the_folder_content_only(project, tmp_path):
    import os

    from stages import check

    photos = tmp_path / "photos"
    make_image_tree(photos, {"cat": 2, "dog": 2})
    root = project(data={"url": str(photos), "sha256": None})

    def fingerprint() -> str:
        check.main()
        return (root / "data/source.json").read_text()

    first = fingerprint()
    assert json.loads(first)["entries"] == 4 and fingerprint() == first
    make_image_tree(photos, {"cat": 1}, start=20)  # a photo added
    added = fingerprint()
    assert added != first
    os.utime(photos / "cat/img_0000.png", ns=(1, 1))  # a photo edited
    assert fingerprint() != added
    (photos / "dog/img_0002.png").rename(photos / "dog/renamed.png")
    assert fingerprint() not in (first, added)
    # An archive's fingerprint needs no network: the URL and its pin say what it is.
    project(data={"url": "https://example.invalid/x.zip"})
    assert json.loads(fingerprint()) == {"kind": "url", "url": "https://example.invalid/x.zip"}
