"""Atomic writes (lib/files.py): a stop at the worst moment leaves no temporary file behind."""

import os
import signal

import pytest

from stages.lib import files


@pytest.mark.parametrize("writer", ["atomic_path", "atomic_dir"])
def test_ctrl_c_right_after_the_temporary_file_is_made_leaves_nothing(tmp_path, monkeypatch, request, writer):
    # Ctrl-C arriving just after the temporary file or folder was made, before the caller's body ran
    name = {"atomic_path": "create_file", "atomic_dir": "create_dir"}[writer]
    make = getattr(files, name)

    def made_then_interrupted(path):
        make(path)
        assert path.exists()
        signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(files, name, made_then_interrupted)
    # Ctrl-C as an interactive run has it: a pytest-xdist worker ignores SIGINT, another test may have left a handler
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    request.addfinalizer(lambda: signal.signal(signal.SIGINT, previous))
    with pytest.raises(KeyboardInterrupt):
        with getattr(files, writer)(tmp_path / "out"):
            pass
    assert list(tmp_path.iterdir()) == []


def test_outputs_are_as_readable_as_the_umask_allows(tmp_path):
    # a temporary file's private 0600 must not become the output's mode
    mask = os.umask(0o022)
    try:
        files.write_text_atomic(tmp_path / "a.txt", "a")
        with files.atomic_dir(tmp_path / "tree") as tmp:
            (tmp / "b.txt").write_text("b")
        with files.atomic_dir(tmp_path / "tree") as tmp:  # replaces the old tree whole
            (tmp / "c.txt").write_text("c")
    finally:
        os.umask(mask)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "tree").stat().st_mode & 0o777 == 0o755
    assert sorted(path.name for path in tmp_path.iterdir()) == ["a.txt", "tree"]
    assert [path.name for path in (tmp_path / "tree").iterdir()] == ["c.txt"]
