"""Atomic writes (lib/files.py): a stop at the worst moment leaves no temporary file behind."""

import os
import signal
import tempfile

import pytest

from stages.lib import files


@pytest.mark.parametrize("writer", ["atomic_path", "atomic_dir"])
def test_ctrl_c_right_after_the_temporary_file_is_made_leaves_nothing(tmp_path, monkeypatch, writer):
    # Ctrl-C arriving just after mkstemp/mkdtemp made the file, before the writer's clean-up began
    name = {"atomic_path": "mkstemp", "atomic_dir": "mkdtemp"}[writer]
    make = getattr(tempfile, name)

    def made_then_interrupted(*args, **kwargs):
        made = make(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGINT)
        return made

    monkeypatch.setattr(files.tempfile, name, made_then_interrupted)
    with pytest.raises(KeyboardInterrupt):
        with getattr(files, writer)(tmp_path / "out"):
            pass
    assert list(tmp_path.iterdir()) == []
