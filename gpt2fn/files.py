"""The one atomic write: every file gpt2fn writes (native and Hugging Face checkpoints, `config.json`, the
training state, the token cache) goes through :func:`atomic_write`.

The bytes go to a temporary file in the target's directory (`.NAME.HOST-PID.RANDOM.gpt2fn-tmp`, created with
mode 0666 so the process umask applies as for `open()`), are flushed and fsync'd, and only then `os.replace`d
over the target (an atomic rename on POSIX and Windows): a crash or a full disk mid-write leaves the previous
file whole. The temporary file is removed on any failure; one left by a hard kill (SIGKILL, power loss) is
removed by :func:`remove_stale_temps`, which `atomic_write` runs for its target and `gpt2fn train` runs over
`--out` at the start of a run. No process-wide state (umask, cwd) is touched.
"""

import os
import re
import secrets
import socket
from collections.abc import Callable
from pathlib import Path
from typing import IO

__all__ = ["atomic_write", "atomic_write_path", "atomic_write_bytes", "atomic_write_text", "remove_stale_temps",
           "TEMP_SUFFIX"]

TEMP_SUFFIX = ".gpt2fn-tmp"
_CHUNK = 1 << 20
_TEMP = re.compile(r"\.(?P<name>.+)\.(?P<host>[^.]+)-(?P<pid>\d+)\.[0-9a-f]+" + re.escape(TEMP_SUFFIX))


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname()) or "host"


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists (another user's) or cannot tell: keep its file
    return True


def remove_stale_temps(directory: str | os.PathLike[str], name: str | None = None) -> list[Path]:
    """Delete temporary files of gpt2fn's own naming in `directory` (for target `name` only, if given) whose
    writer, a process on this host, no longer exists. Returns the removed paths. Other files are never touched."""
    directory = Path(directory)
    removed: list[Path] = []
    try:
        entries = list(directory.iterdir())
    except OSError:
        return removed
    host = _host()
    for p in entries:
        m = _TEMP.fullmatch(p.name)
        if m is None or m["host"] != host or (name is not None and m["name"] != name):
            continue
        if not _alive(int(m["pid"])):
            try:
                p.unlink()
                removed.append(p)
            except OSError:
                pass
    return removed


def _temp_for(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path.parent, path.name)
    return path.with_name(f".{path.name}.{_host()}-{os.getpid()}.{secrets.token_hex(4)}{TEMP_SUFFIX}")


def _create(tmp: Path) -> int:
    return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)


def atomic_write(path: str | os.PathLike[str], write: Callable[[IO[bytes]], None]) -> Path:
    """Call `write(fileobj)` on a temporary file next to `path`, fsync it, then rename it over `path`."""
    path = Path(path)
    tmp = _temp_for(path)
    fd = _create(tmp)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_path(path: str | os.PathLike[str], write: Callable[[Path], None]) -> Path:
    """Like :func:`atomic_write` for writers that take a file name (`safetensors.torch.save_file`): `write(tmp)`
    fills the temporary file by name (streaming, no copy of the bytes in memory), then it is fsync'd and renamed."""
    path = Path(path)
    tmp = _temp_for(path)
    os.close(_create(tmp))
    try:
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes | bytearray | memoryview) -> Path:
    """:func:`atomic_write` of `data` (written in 1 MiB pieces, so no second copy is made)."""
    view = memoryview(data).cast("B")

    def write(fh: IO[bytes]) -> None:
        for i in range(0, len(view), _CHUNK):
            fh.write(view[i:i + _CHUNK])

    return atomic_write(path, write)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """:func:`atomic_write` of `text` as UTF-8."""
    return atomic_write_bytes(path, text.encode("utf-8"))
