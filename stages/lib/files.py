"""Writing outputs so that a failed or interrupted run never leaves a half-written one behind, and
reading the pipeline's tables back as they were written."""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import os
import secrets
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

from stages.lib.cli import UserError


def save_torch_atomic(target: Path, obj: Any) -> None:
    """torch.save, byte-identical for identical content: torch names the archive's inner
    folder after the file, so a temporary file's random name would leak into the bytes."""
    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    with atomic_path(target) as tmp:
        tmp.write_bytes(buffer.getvalue())


TENSORS_META = "json"  # the one metadata key of a tensors file: everything but the tensors, as JSON


def save_tensors_atomic(target: Path, tensors: dict, meta: dict) -> None:
    """A safetensors file of `tensors` (numpy arrays or CPU torch tensors, float32 or int64) with
    `meta` as JSON in its header. No pickle: reading one runs no code, and numpy alone reads it,
    so a stage that only scores a head on cached features runs without torch (2 s of start-up)."""
    import numpy as np
    from safetensors.numpy import save

    # np.array(order="C"), not np.ascontiguousarray, which makes a 0-d array (a BatchNorm's count) 1-d
    arrays = {name: np.array(value if isinstance(value, np.ndarray) else value.detach().cpu().numpy(), order="C")
              for name, value in tensors.items()}
    data = save(arrays, metadata={TENSORS_META: json.dumps(meta, sort_keys=True)})
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)


def read_tensors(path: Path, names: Sequence[str] | None = None) -> tuple[dict, dict]:
    """The numpy arrays (all, or those `names`) and the metadata of a file save_tensors_atomic
    wrote; raises (safetensors' SafetensorError, or ValueError) for a file of another kind."""
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as file:
        meta = json.loads((file.metadata() or {}).get(TENSORS_META, "null"))
        if not isinstance(meta, dict):
            raise ValueError("a safetensors file without this project's metadata")
        return {name: file.get_tensor(name) for name in (file.keys() if names is None else names)}, meta


def unwritable(target: Path, error: OSError) -> UserError:
    return UserError(f"{target}: cannot write it in {target.parent}/ ({error.strerror or error}); "
                     "make that folder writable, or run where it is")


def temporary_beside(target: Path, suffix: str) -> Path:
    """A fresh hidden name beside `target`: 64 random bits, so no two writers share one."""
    return target.parent / f".{target.name}.{secrets.token_hex(8)}{suffix}"


def create_file(path: Path) -> None:
    # 0o666 through the umask: outputs are as readable as any file the user makes
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))


def create_dir(path: Path) -> None:
    os.mkdir(path, 0o777)


@contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yield a temporary path beside `target`; on success it replaces `target` in one rename.
    The temporary file is made inside the `try` that removes it, so a Ctrl-C at any moment
    leaves nothing behind."""
    tmp = temporary_beside(target, ".tmp")
    try:
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            create_file(tmp)
        except OSError as error:
            raise unwritable(target, error) from None
        yield tmp
        os.replace(tmp, target)
    finally:
        if os.path.lexists(tmp):  # unlink on a read-only folder fails even for a name that is not there
            tmp.unlink()


def write_text_atomic(target: Path, text: str) -> None:
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(target: Path, data: Any) -> None:
    write_text_atomic(target, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


# The columns of the pipeline's CSVs that hold class names, paths, splits and hashes: text, whatever
# they look like. A class folder named `0` or `02` is the class "0" or "02", not a number (pandas
# would read both as 0 and 2, and `01` and `1` as one class).
TEXT_COLUMNS = ("path", "path_a", "path_b", "class", "true", "actual", "predicted", "given", "suggested", "split",
                "split_a", "split_b", "sha256", "error")


def read_csv(source):
    """A CSV the pipeline wrote (a path or a text stream), its class names and paths as text (every
    `*_class` column too); the other columns as pandas reads them. An empty field is "", not NaN."""
    import pandas as pd

    header = pd.read_csv(source, nrows=0).columns
    if hasattr(source, "seek"):
        source.seek(0)
    text = {name: str for name in header if name in TEXT_COLUMNS or name.endswith("_class")}
    return pd.read_csv(source, dtype=text, keep_default_na=False)


def write_csv_atomic(target: Path, table) -> None:
    """A pandas table as CSV, without its index, with \\n line ends whatever the platform."""
    with atomic_path(target) as tmp:
        table.to_csv(tmp, index=False, lineterminator="\n")


@contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield an empty temporary directory beside `target`; on success it becomes `target`."""
    tmp = temporary_beside(target, ".tmp")
    try:
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            create_dir(tmp)
        except OSError as error:
            raise unwritable(target, error) from None
        yield tmp
        if target.exists():
            # Move the old tree aside first so that `target` is never a mix of old and new.
            old = temporary_beside(target, ".old")
            os.replace(target, old)
            try:
                os.replace(tmp, target)
            except BaseException:
                os.replace(old, target)
                raise
            shutil.rmtree(old)
        else:
            os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def file_sha256(path, algorithm: str = "sha256") -> str:
    """The sha256 (or another hashlib digest) of a file, read in 1 MiB blocks: archives may be gigabytes."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


SHORT_MD5 = 7  # hex digits, as git and `dvc exp show` shorten hashes


def short_md5(path) -> str:
    """The start of a file's md5, as dvc.lock records it: what an on-demand stage's headline
    metrics name, so that a figure says which model or data it was measured on."""
    return file_sha256(path, "md5")[:SHORT_MD5]


@contextmanager
def only_writer(lock: Path, what: str) -> Iterator[None]:
    """Hold an exclusive lock on `lock` while writing `what`; a second writer is refused with one line
    naming the process that holds it. A POSIX record lock: the kernel releases it when its holder
    dies, however, and the data loader's forked workers do not inherit it."""
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a+") as handle:
        try:
            fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            raise UserError(f"{what}: another process ({holder}) is writing it; wait for it to finish, or stop "
                            f"it (kill {holder})") from None
        handle.truncate(0)
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        yield
