"""A warm interpreter for stage processes, so a stage pays for its work and not for its imports.

DVC starts every stage as a new process, and importing torch, torch._dynamo (the first optimizer
imports it), timm, pandas and matplotlib takes 4-5 s on a 2-core machine: more than all the work
of a head-only experiment's train, evaluate and export together. So after a stage has run the
usual way, it leaves a server behind: a process that has imported those libraries, and nothing of
the project, waiting on a Unix socket. The next `python -m stages NAME` (stages/__main__.py)
connects and hands over its arguments, working directory, environment and standard streams; the
server forks, and the fork runs `python -m stages NAME` there with runpy, as a new interpreter
would. The project's own modules are imported fresh in every fork, so an edited stage or library
module takes effect at once and a stage's outputs are the same bytes as in a cold process.

The client waits, passes SIGINT, SIGTERM and SIGHUP on to the stage, and exits with its status.
If the client is killed (even by SIGKILL), the stage process and its children are killed with it.
A server serves one Python environment: its socket is named by a hash of the interpreter, sys.path
(with each entry's modification time, which an install changes) and the environment variables
(those DVC sets per stage left out), so anything that could change what the preloaded libraries
did at import gets its own server. It exits after DVC_TRANSFER_WARM_IDLE seconds unused (default
900). DVC_TRANSFER_WARM=0 turns all of this off; it is off outside Linux (forking after these
imports is unsafe on macOS) and under torchrun. `python -m stages.lib.warm status` shows the server
of the current environment, `python -m stages.lib.warm stop` stops all of this user's.
"""

from __future__ import annotations

import atexit
import fcntl
import gc
import hashlib
import importlib
import json
import os
import runpy
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

# The stages' libraries (DVCLive looks for the DVC repo through dvc.repo and scmrepo); a missing
# one is skipped. DVC_TRANSFER_WARM_PRELOAD (comma-separated) replaces the list.
PRELOAD = ("numpy", "pandas", "PIL.Image", "yaml", "pydantic", "tqdm", "torch", "torch._dynamo", "torchvision",
           "timm", "sklearn.metrics", "scipy.stats", "matplotlib.pyplot", "dvclive", "dvc.repo", "scmrepo.git",
           "onnx", "onnx.compose")
CHILD_MARK = "DVC_TRANSFER_WARM_CHILD"  # set in the stage process: it runs the stage, nothing more
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
DEFAULT_IDLE = 900.0
# Set orderings follow string hashes, which Python salts per process unless PYTHONHASHSEED is set,
# and TorchScript writes a module's constants in set order: every stage runs with this seed
# (stages/__main__.py), so the export is the same bytes in every run, warm or cold.
HASH_SEED = "0"
# Variables that differ from call to call and that no library reads at import (DVC_* too: the
# ones DVC sets per stage and experiment, and this module's own)
PER_CALL = ("PWD", "OLDPWD", "SHLVL", "_", "PYTEST_CURRENT_TEST")
MESSAGE = 1 << 20  # bytes: the request carries the whole environment


def enabled() -> bool:
    return (sys.platform == "linux" and os.environ.get("DVC_TRANSFER_WARM", "1") != "0"
            and CHILD_MARK not in os.environ and "WORLD_SIZE" not in os.environ
            and hasattr(os, "pidfd_open") and hasattr(socket, "send_fds"))


def preloaded() -> list[str]:
    names = os.environ.get("DVC_TRANSFER_WARM_PRELOAD")
    return list(PRELOAD) if names is None else [n for n in names.split(",") if n]


def server_folder() -> Path | None:
    """This user's folder of sockets, or None when it is not private (then nothing runs warm)."""
    folder = Path(os.environ.get("DVC_TRANSFER_WARM_DIR")
                  or Path(os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()) / f"dvc-transfer-{os.getuid()}")
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = folder.stat()
    except OSError:
        return None
    return folder if info.st_uid == os.getuid() and not info.st_mode & 0o077 else None


def environment_key() -> str:
    """What decides the state of the preloaded libraries: the interpreter, sys.path and the
    environment. sys.path[0] (the working directory of `python -m`) is set per stage."""
    paths = []
    for entry in sys.path[1:]:
        try:
            paths.append([entry, os.stat(entry).st_mtime_ns])
        except OSError:
            paths.append([entry, None])
    env = sorted((k, v) for k, v in os.environ.items() if not k.startswith("DVC_") and k not in PER_CALL)
    blob = json.dumps([os.path.realpath(sys.executable), sys.version, paths, env, preloaded()])
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def socket_path() -> Path | None:
    folder = server_folder()
    return None if folder is None else folder / f"{environment_key()}.sock"


# The client: stages/__main__.py.

def run_warm(argv: list[str]) -> int | None:
    """Run `python -m stages *argv[1:]` in a warm process; its exit status, or None when no
    server took it (then the caller runs the stage itself)."""
    path = socket_path()
    if path is None:
        return None
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    request = json.dumps({"argv": argv, "cwd": os.getcwd(), "path0": sys.path[0], "env": dict(os.environ)})
    try:
        conn.connect(str(path))
        socket.send_fds(conn, [request.encode()], [0, 1, 2])
        if conn.recv(64) != b"started":  # the server was shutting down: run cold
            return None
    except OSError:
        return None

    def forward(number, _frame):
        try:
            conn.send(f"signal {number}".encode())
        except OSError:
            pass

    for number in FORWARDED:
        signal.signal(number, forward)
    reply = conn.recv(64)
    if not reply.startswith(b"exit "):
        print("error: the warm stage process ended without a status; run with DVC_TRANSFER_WARM=0", file=sys.stderr)
        return 1
    code = int(reply.split()[1])
    return 128 - code if code < 0 else code  # killed by signal N: 128 + N, as a shell reports it


def start_server() -> None:
    """Leave a server for the next stage, unless one is running or starting."""
    path = socket_path()
    if path is None or server_is_up(path):
        return
    subprocess.Popen([sys.executable, "-m", "stages.lib.warm", "serve", str(path)], stdin=subprocess.DEVNULL,
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def server_is_up(path: Path) -> bool:
    with open(path.with_suffix(".lock"), "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(lock, fcntl.LOCK_UN)
    return False


# The server, a session per client, and the stage process.

def serve(path: Path) -> None:
    lock = open(path.with_suffix(".lock"), "a+")  # held while this server lives, with its pid in it
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return
    lock.truncate(0)
    lock.write(str(os.getpid()))
    lock.flush()
    os.chdir("/")
    for name in preloaded():
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 - a library that does not import is imported (or not) by the stage
            pass
    # The project's modules are the stage's to import, from its own working directory.
    for name in [n for n in sys.modules if n == "stages" or n.startswith("stages.")]:
        del sys.modules[name]
    gc.collect()
    gc.freeze()
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # sessions are reaped by the kernel
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    fresh = path.with_name(f"{path.name}.{os.getpid()}")
    listener.bind(str(fresh))
    listener.listen(16)
    os.replace(fresh, path)
    inode = path.stat().st_ino
    listener.settimeout(float(os.environ.get("DVC_TRANSFER_WARM_IDLE", DEFAULT_IDLE)))
    try:
        while True:
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                return
            if os.fork() == 0:
                listener.close()
                run_session(conn)
            conn.close()
    finally:
        if path.exists() and path.stat().st_ino == inode:
            path.unlink()
        listener.close()


def run_session(conn: socket.socket) -> None:
    """Start the stage process for one client and watch both until the stage ends; never returns."""
    try:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        data, fds, _, _ = socket.recv_fds(conn, MESSAGE, 3)
        request = json.loads(data)
        pid = os.fork()
        if pid == 0:
            conn.close()
            run_stage_process(request, fds)
        for fd in fds:
            os.close(fd)
        conn.send(b"started")
        conn.send(f"exit {wait_for_stage(conn, pid)}".encode())
    except BaseException:  # noqa: BLE001 - whatever happens, a session never returns into the server
        pass
    os._exit(0)


def wait_for_stage(conn: socket.socket, pid: int) -> int:
    """Pass the client's signals on; kill the stage's process group if the client dies. Returns
    its exit code (minus the signal number if a signal ended it)."""
    events = selectors.DefaultSelector()
    events.register(conn, selectors.EVENT_READ)
    events.register(os.pidfd_open(pid), selectors.EVENT_READ)
    while True:
        for key, _ in events.select():
            if key.fileobj is not conn:
                return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
            message = conn.recv(64)
            try:
                if message:
                    os.kill(pid, int(message.split()[1]))
                else:  # the client is gone, and nobody waits for this stage any more
                    events.unregister(conn)
                    os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def run_stage_process(request: dict, fds: list[int]) -> None:
    """Become `python -m stages ...` in the client's directory, environment and streams; never returns."""
    os.setsid()  # a process group of its own, so the stage and its workers die together
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    for number in (*FORWARDED, signal.SIGCHLD):
        signal.signal(number, signal.default_int_handler if number == signal.SIGINT else signal.SIG_DFL)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"], **{CHILD_MARK: "1"})
    sys.path[0] = request["path0"]
    sys.argv = list(request["argv"])
    sys.stdout.reconfigure(line_buffering=sys.stdout.isatty())
    code = 0
    try:
        runpy.run_module("stages", run_name="__main__", alter_sys=True)
    except SystemExit as done:
        if done.code is None or isinstance(done.code, int):
            code = done.code or 0
        else:
            print(done.code, file=sys.stderr)
            code = 1
    except KeyboardInterrupt:
        code = 130
    except BaseException:  # noqa: BLE001 - reported as the interpreter would
        traceback.print_exc()
        code = 1
    try:
        atexit._run_exitfuncs()  # what the interpreter runs at exit: logging, multiprocessing
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def stop_servers() -> int:
    """Stop every server of this user (in this DVC_TRANSFER_WARM_DIR); how many there were."""
    folder = server_folder()
    stopped = 0
    for lock in folder.glob("*.lock") if folder else []:
        if server_is_up(lock.with_suffix(".sock")):
            try:
                os.kill(int(lock.read_text()), signal.SIGTERM)
                stopped += 1
            except (ValueError, ProcessLookupError):
                pass
    return stopped


if __name__ == "__main__":
    if sys.argv[1:2] == ["serve"] and len(sys.argv) == 3:
        serve(Path(sys.argv[2]))
    elif sys.argv[1:] == ["stop"]:
        print(f"stopped {stop_servers()} warm server(s)")
    elif sys.argv[1:] == ["status"]:
        os.environ["PYTHONHASHSEED"] = HASH_SEED  # as in a stage
        where = socket_path()
        print(f"{where} {'up' if where and server_is_up(where) else 'down'}")
    else:
        raise SystemExit("usage: python -m stages.lib.warm {serve SOCKET,stop,status}")
