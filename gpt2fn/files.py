"""The one atomic write: every file gpt2fn writes (native and Hugging Face checkpoints, `config.json`, the
training state, the token cache) goes through :func:`atomic_write`.

The bytes go to a temporary file in the target's directory (`.NAME.HOST-PID.RANDOM.gpt2fn-tmp`, created with
mode 0666 so the process umask applies as for `open()`), are flushed and fsync'd, and only then `os.replace`d
over the target (an atomic rename on POSIX and Windows): a crash or a full disk mid-write leaves the previous
file whole. The temporary file is removed on any failure; one left by a hard kill (SIGKILL, power loss) is
removed by :func:`remove_stale_temps`, which `atomic_write` runs for its target and `gpt2fn train` runs over
`--out` at the start of a run. No process-wide state (umask, cwd) is touched.

The user cache, `$XDG_CACHE_HOME/gpt2fn` (default `~/.cache/gpt2fn`; a relative `XDG_CACHE_HOME` is ignored, as the
XDG spec says), is :func:`cache_dir`. Every file gpt2fn puts there to reuse is verified before it is used:
:func:`cached_entry` keeps beside each entry `NAME` a check file `NAME.check` (JSON: the entry's key, its size in
bytes and its sha256), written atomically *after* the data, and hands back an open file only when the data matches
its check. A missing, short, altered or swapped-in entry (another key's file) is rebuilt, with one warning line
(logger `gpt2fn`) that says what was damaged. Builders of one entry take the lock file `NAME.lock` (`filelock`), so
concurrent processes build it once; readers take the lock only when a check fails, to tell a build in progress
from damage. The caller uses the open file it is given (a memory map of it, or `/proc/self/fd/N` for `dlopen`), so
what it reads is the very file that was verified, even if the name is replaced meanwhile.
"""

import hashlib
import json
import logging
import os
import re
import secrets
import socket
from collections.abc import Callable
from pathlib import Path
from typing import IO

import filelock

__all__ = ["atomic_write", "atomic_write_path", "atomic_write_bytes", "atomic_write_text", "append_line",
           "remove_stale_temps", "cache_dir", "cached_entry", "open_checked", "write_check", "sha256_of",
           "TEMP_SUFFIX", "CHECK_SUFFIX", "LOCK_SUFFIX"]

log = logging.getLogger("gpt2fn")

TEMP_SUFFIX = ".gpt2fn-tmp"
CHECK_SUFFIX = ".check"
LOCK_SUFFIX = ".lock"
_CHECK_FORMAT = "gpt2fn-check-v1"
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


def append_line(path: str | os.PathLike[str], line: str) -> None:
    """Append `line` (a newline is added) to a log such as `metrics.jsonl` in one `write` on an `O_APPEND` file:
    concurrent appends never interleave, and a crash can cut only the last line short, which readers of such
    logs drop (a line without its newline is not a line). The log is rewritten whole with :func:`atomic_write_text`."""
    data = (line.rstrip("\n") + "\n").encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_BINARY", 0), 0o666)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def cache_dir(*parts: str) -> Path:
    """gpt2fn's user cache, `$XDG_CACHE_HOME/gpt2fn` (default `~/.cache/gpt2fn`), joined with `parts`; read at each
    call, so a changed environment takes effect at once. Not created here."""
    root = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(root) if root and os.path.isabs(root) else Path.home() / ".cache"
    return base.joinpath("gpt2fn", *parts)


def sha256_of(fh: IO[bytes]) -> tuple[int, str]:
    """`(size, sha256 hex)` of an open binary file from its start, read in 1 MiB pieces; leaves it at its start."""
    fh.seek(0)
    h, size = hashlib.sha256(), 0
    while piece := fh.read(_CHUNK):
        h.update(piece)
        size += len(piece)
    fh.seek(0)
    return size, h.hexdigest()


def _check_path(path: Path) -> Path:
    return path.with_name(path.name + CHECK_SUFFIX)


def write_check(path: str | os.PathLike[str], key: str) -> Path:
    """Record, atomically in `NAME.check`, that the file at `path` as it is now is the entry for `key`."""
    path = Path(path)
    with open(path, "rb") as fh:
        size, digest = sha256_of(fh)
    record = {"format": _CHECK_FORMAT, "key": key, "size": size, "sha256": digest}
    return atomic_write_text(_check_path(path), json.dumps(record) + "\n")


def open_checked(path: str | os.PathLike[str], key: str) -> tuple[IO[bytes] | None, str | None]:
    """`(file, None)`: `path` opened for reading, its bytes verified against `NAME.check` for `key`; or
    `(None, why)` when there is no entry (`why` is None) or it fails its check (`why` says how)."""
    path = Path(path)
    try:
        fh = open(path, "rb")
    except FileNotFoundError:
        return None, ("its data file is missing" if _check_path(path).exists() else None)
    except OSError as exc:
        return None, f"it cannot be read ({exc})"
    try:
        why = _mismatch(fh, _check_path(path), key)
    except BaseException:
        fh.close()
        raise
    if why is not None:
        fh.close()
        return None, why
    return fh, None


def _mismatch(fh: IO[bytes], check: Path, key: str) -> str | None:
    try:
        record = json.loads(check.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return f"it has no check file {check.name} (an older gpt2fn wrote it, or the check was lost)"
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        return f"its check file {check.name} is unreadable ({type(exc).__name__})"
    if not isinstance(record, dict) or record.get("format") != _CHECK_FORMAT:
        return f"its check file {check.name} is not a {_CHECK_FORMAT} record"
    if record.get("key") != key:
        return f"it is the entry for key {str(record.get('key'))[:40]!r}, not {key!r}"
    actual = os.fstat(fh.fileno()).st_size
    if actual != record.get("size"):
        return f"it has {actual} bytes, its check says {record.get('size')}"
    size, digest = sha256_of(fh)
    if size != record.get("size") or digest != record.get("sha256"):
        return "its sha256 differs from its check's"
    return None


def cached_entry(path: str | os.PathLike[str], key: str, build: Callable[[Path], None], *,
                 what: str) -> IO[bytes]:
    """The cache entry at `path` for `key`, verified and open for reading (the caller closes it).

    When there is none, or it fails its check, `build(tmp)` writes it into a temporary file by name, which is
    renamed into place (:func:`atomic_write_path`) and then checked in (:func:`write_check`), all under the entry's
    lock; a damaged entry also logs one warning naming `what` (a noun phrase: "the token cache of ...") and the
    damage. Errors of `build` propagate."""
    path = Path(path)
    fh, why = open_checked(path, key)
    if fh is not None:
        return fh
    path.parent.mkdir(parents=True, exist_ok=True)
    with filelock.FileLock(str(path.with_name(path.name + LOCK_SUFFIX))):
        fh, why = open_checked(path, key)  # a build that held the lock may have just finished it
        if fh is not None:
            return fh
        if why is not None:
            log.warning("gpt2fn: %s at %s is damaged (%s); rebuilding it", what, path, why)
        atomic_write_path(path, build)
        write_check(path, key)
        fh, why = open_checked(path, key)
    if fh is None:
        raise OSError(f"{what} just written to {path} fails its own check ({why}); is the disk full or failing?")
    return fh
