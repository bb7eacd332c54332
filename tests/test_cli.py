"""What every stage program shares (lib/cli.py, stages/__init__.py): the collector waits for the imports."""

import gc
import subprocess
import sys

from stages.lib.cli import run_stage
from tests.conftest import PROJECT_ROOT


def test_a_stage_program_imports_with_the_collector_off():
    # As `python -m stages...` imports the package: sys.argv[0] is "-m" while the module is found.
    probe = "import sys; sys.argv = ['-m']; import gc, stages; print(gc.isenabled())"
    done = subprocess.run([sys.executable, "-c", probe], cwd=PROJECT_ROOT, capture_output=True, text=True)
    assert done.stdout.strip() == "False", done.stderr
    assert gc.isenabled()  # imported as a library, as here: nothing changes


def test_run_stage_freezes_the_imports_and_turns_the_collector_back_on():
    gc.disable()
    try:
        assert run_stage(lambda: gc.isenabled()) is True
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
        gc.enable()
