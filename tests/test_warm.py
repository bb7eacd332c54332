"""The warm stage processes (stages/lib/warm.py): same results as a cold process, signals passed
on, a killed client takes its stage with it, and every way of not having a server falls back to
running the stage the usual way."""

from __future__ import annotations

import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from stages.lib import warm
from tests.conftest import PROJECT_ROOT

# A server that preloads next to nothing starts in a moment; the protocol is the same.
LIGHT = {"DVC_TRANSFER_WARM_PRELOAD": "json"}


def stage_env(**extra) -> dict:
    return {**os.environ, **extra}


def run_stage(root: Path, name: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stages", name], cwd=root, env=env, capture_output=True, text=True)


def wait_for(condition, seconds: float = 60, what: str = "condition") -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def ensure_server(root: Path, env: dict) -> None:
    """The server of this environment, left behind by a stage run cold if there was none."""
    status = subprocess.run([sys.executable, "-m", "stages.lib.warm", "status"], cwd=root, env=env,
                            capture_output=True, text=True, check=True).stdout.split()
    path = Path(status[0])
    if not warm.server_is_up(path):
        result = run_stage(root, "check_params", env)
        assert result.returncode == 0, result.stderr
    wait_for(lambda: path.exists() and warm.server_is_up(path), what="the warm server")


@pytest.fixture
def shadow_project(project):
    """A project with its own copy of the stages package, whose check_params also records the
    process it ran in, and sleeps as long as sleep.txt says: the warm run must import this copy, as edited."""
    root = project()
    shutil.copytree(PROJECT_ROOT / "stages", root / "stages", ignore=shutil.ignore_patterns("__pycache__"))
    module = root / "stages" / "check_params.py"
    module.write_text(module.read_text().replace(
        "def main() -> None:\n",
        "def main() -> None:\n"
        "    import os, time\n"
        "    mark = os.environ.get('DVC_TRANSFER_WARM_CHILD')\n"
        "    Path('ran_in.txt').write_text(f'{os.getpid()} {os.getppid()} {mark}')\n"
        "    time.sleep(float(Path('sleep.txt').read_text()) if Path('sleep.txt').is_file() else 0)\n",
    ).replace("import yaml\n", "import yaml\nfrom pathlib import Path\n"))
    return root


def ran_in(root: Path) -> tuple[int, int, str]:
    pid, parent, mark = (root / "ran_in.txt").read_text().split()
    return int(pid), int(parent), mark


def test_the_key_follows_what_imports_see_and_ignores_what_dvc_sets_per_stage(monkeypatch):
    base = warm.environment_key()
    monkeypatch.setenv("DVC_EXP_NAME", "some-experiment")
    monkeypatch.setenv("PYTEST_CURRENT_TEST", "another test")
    assert warm.environment_key() == base
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert warm.environment_key() != base
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setenv("DVC_TRANSFER_WARM_PRELOAD", "json")
    assert warm.environment_key() != base


def test_a_socket_folder_others_can_enter_is_not_used(tmp_path, monkeypatch):
    folder = tmp_path / "sockets"
    folder.mkdir(mode=0o755)
    folder.chmod(0o755)
    monkeypatch.setenv("DVC_TRANSFER_WARM_DIR", str(folder))
    assert warm.server_folder() is None and warm.run_warm(["stages", "check_params"]) is None
    folder.chmod(0o700)
    assert warm.server_folder() == folder


def test_without_a_live_server_the_stage_runs_cold(tmp_path, monkeypatch):
    folder = tmp_path / "sockets"
    monkeypatch.setenv("DVC_TRANSFER_WARM_DIR", str(folder))
    assert warm.run_warm(["stages", "check_params"]) is None  # no socket at all
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    stale.bind(str(warm.socket_path()))  # bound, never listening: a server that died
    stale.close()
    assert warm.run_warm(["stages", "check_params"]) is None
    assert not warm.server_is_up(warm.socket_path())


@pytest.mark.slow
def test_a_warm_run_imports_the_project_code_as_edited_and_reports_errors_as_a_cold_one(shadow_project):
    env = stage_env(**LIGHT)
    cold = run_stage(shadow_project, "check_params", stage_env(**LIGHT, DVC_TRANSFER_WARM="0"))
    assert cold.returncode == 0 and ran_in(shadow_project)[2] == "None"
    ensure_server(shadow_project, env)

    result = run_stage(shadow_project, "check_params", env)
    assert result.returncode == 0 and result.stderr == cold.stderr
    assert ran_in(shadow_project)[2] == "1"  # run by a fork of the server, the edited module imported

    (shadow_project / "params.yaml").write_text((shadow_project / "params.yaml").read_text() + "surprise: 1\n")
    bad = run_stage(shadow_project, "check_params", env)
    assert bad.returncode == 1
    assert bad.stderr.strip().splitlines()[-1].startswith("error: ") and "surprise" in bad.stderr


@pytest.mark.slow
def test_signals_reach_the_stage_and_a_killed_client_takes_its_stage_along(shadow_project):
    env = stage_env(**LIGHT)
    ensure_server(shadow_project, env)
    (shadow_project / "sleep.txt").write_text("60")
    (shadow_project / "ran_in.txt").unlink(missing_ok=True)

    client = subprocess.Popen([sys.executable, "-m", "stages", "check_params"], cwd=shadow_project, env=env)
    wait_for(lambda: (shadow_project / "ran_in.txt").is_file(), what="the stage to start")
    stage, parent, mark = ran_in(shadow_project)
    assert mark == "1" and parent != client.pid
    client.send_signal(signal.SIGTERM)
    assert client.wait(timeout=30) == 128 + signal.SIGTERM  # the stage died of it, and the client says so
    wait_for(lambda: not pid_alive(stage), 10, "the stage to end")

    (shadow_project / "ran_in.txt").unlink()
    client = subprocess.Popen([sys.executable, "-m", "stages", "check_params"], cwd=shadow_project, env=env)
    wait_for(lambda: (shadow_project / "ran_in.txt").is_file(), what="the stage to start")
    stage, _, _ = ran_in(shadow_project)
    client.kill()
    client.wait()
    wait_for(lambda: not pid_alive(stage), 10, "the orphaned stage to be killed")


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ")[1][0] != "Z"  # a zombie has ended
    except FileNotFoundError:
        return False


@pytest.mark.slow
def test_an_idle_server_exits_and_removes_its_socket(tmp_path, monkeypatch):
    monkeypatch.setenv("DVC_TRANSFER_WARM_DIR", str(tmp_path / "sockets"))
    path = warm.socket_path()
    server = subprocess.Popen([sys.executable, "-m", "stages.lib.warm", "serve", str(path)], cwd=PROJECT_ROOT,
                              env=stage_env(**LIGHT, DVC_TRANSFER_WARM_IDLE="0.5"))
    assert server.wait(timeout=60) == 0
    assert not path.exists() and not warm.server_is_up(path)


@pytest.mark.slow
def test_warm_stages_write_the_same_bytes_as_cold_ones(tiny_project):
    root = tiny_project()
    outputs = ["models/model.pt", "metrics/train/metrics.json", "metrics/eval.json", "metrics/predictions.csv",
               "metrics/eval/top_losses.csv", "models/export/model.ts", "models/export/model.onnx",
               "models/export/model.json"]
    stages = ["check_params", "train", "evaluate", "export_backbone", "export"]

    def run_all(env) -> dict[str, bytes]:
        for name in stages:
            result = run_stage(root, name, env)
            assert result.returncode == 0, result.stderr
        return {path: (root / path).read_bytes() for path in outputs}

    cold = run_all(stage_env(DVC_TRANSFER_WARM="0"))
    ensure_server(root, stage_env())
    warm_run = run_all(stage_env())
    # TorchScript keeps, as debug information, the Python call stack that traced each module,
    # which runs through lib/warm.py in a warm process; the code and weights must be the same.
    warm_code, cold_code = (torchscript_without_debug_info(run.pop(TORCHSCRIPT)) for run in (warm_run, cold))
    assert warm_code == cold_code
    assert warm_run == cold


TORCHSCRIPT = "models/export/model.ts"


def torchscript_without_debug_info(data: bytes) -> dict[str, bytes]:
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        return {name: archive.read(name) for name in archive.namelist()
                if not name.endswith(".debug_pkl") and not name.endswith("serialization_id")}
