"""Atomic file writes: readers see the old file or the whole new one, never half of it.

`atomic_file` writes a temp file beside the target, flushes and fsyncs it, then `os.replace`s it over
the target. If the writer fails, the temp file is deleted and the old file stays as it was. The single
files komt writes for a user go through it (safetensors shards and adapters, indexes, configs, metrics);
whole folders (training checkpoints, merged models, the multi-task mix) are built in a temp folder that is
renamed into place (`new_temp_folder`, `publish_folder`), on the same principle.

A writer killed outright (SIGKILL, power loss) cannot delete its temp file, and a shard's can be
gigabytes. So temp files are named for their target, `.<name>.komt-tmp-XXXXXXXX`, and each writer holds
an exclusive `flock` on its own while it writes: the next `atomic_file` (or `remove_stale_temp_files`)
for the same target deletes every such file whose lock it can take, i.e. whose writer is dead. A live
writer's lock keeps its file safe. (Without `fcntl`, on Windows, stale files are left alone.)
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

TEMP_MARK = ".komt-tmp-"


def current_umask() -> int:
    """The process umask (reading it means setting it, so set it straight back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def temp_prefix(path: Path) -> str:
    """The name every temp file of `path` starts with: `.<name>.komt-tmp-`."""
    return f".{path.name}{TEMP_MARK}"


def remove_stale_temp_files(path: str | os.PathLike) -> list[Path]:
    """Delete the temp files of `path` left by writers that died (see module docstring); return them."""
    path = Path(path)
    if fcntl is None or not path.parent.is_dir():
        return []
    removed = []
    for candidate in path.parent.glob(temp_prefix(path) + "*"):
        try:
            fd = os.open(candidate, os.O_RDONLY | os.O_NONBLOCK)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises while its writer lives
            candidate.unlink()
            removed.append(candidate)
        except OSError:
            pass
        finally:
            os.close(fd)
    return removed


@contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "w") -> Iterator[IO]:
    """Open a temp file beside `path` ("w" text in UTF-8, or "wb"); on success it replaces `path`."""
    path = Path(path)
    remove_stale_temp_files(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=temp_prefix(path))
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)  # held until the file is closed: "a writer is alive"
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600; the result is an ordinary file
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
            if fcntl is not None:  # rename while still locked, so no cleaner can take the file first
                os.replace(tmp, path)
        if fcntl is None:  # Windows cannot rename an open file
            os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_file(path) as f:
        f.write(text)


def new_temp_folder(target: Path) -> Path:
    """A fresh hidden folder beside `target`, `.<name>.XXXXXXXX.tmp`, to build `target` in."""
    return Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))


def publish_folder(tmp: Path, target: Path) -> Path:
    """Rename the finished temp folder `tmp` to `target` (the commit point: readers see all of it or none)
    and fsync their parent, so the rename outlives a power cut. `target` must not exist (or be empty)."""
    os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes 0700; the result is an ordinary folder
    os.replace(tmp, target)
    fd = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return target


def write_json_atomic(path: str | os.PathLike, data: object) -> None:
    """`data` as indented JSON (UTF-8 text as is, not ASCII escapes) and a final newline, atomically."""
    write_text_atomic(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")
