"""The one writer of files. A whole file is written so that an interruption never leaves half of it
behind: through a temporary file of its own (a unique name, so two writers never share one) in the
same directory, renamed into place (os.replace is atomic on one filesystem). A stream of lines
(`LineWriter`) is locked against a second writer and never ends in half a line. Before any work, the
CLI checks every output path (`check_writable`) and that no output is an input or another output
(`check_distinct`)."""
from __future__ import annotations

import errno
import fcntl
import os
import tempfile
from pathlib import Path

from specmoe.planner.errors import SpecError


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write `text` to `path` through a temporary file renamed into place; the file gets the mode a
    plain open() would give it (0666 less the umask)."""
    return _atomic_write(path, text, "w")


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """atomic_write_text for bytes (a converted checkpoint's safetensors)."""
    return _atomic_write(path, data, "wb")


def _atomic_write(path: str | Path, data: str | bytes, mode: str) -> Path:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_tmp_prefix(path), suffix=".tmp")
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file a normal file's mode
        with os.fdopen(fd, mode) as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path


def _tmp_prefix(path: Path) -> str:
    return f".{path.name[:64]}."          # the temporary name stays legal for the longest legal names


def check_writable(path: str | Path, option: str) -> Path:
    """Refuse, before any work, an output path that cannot be written: an existing directory or
    special file (a replace would swap the device node), a missing parent, a directory where no file
    can be created (/proc, read-only, no permission), a name the filesystem refuses."""
    p = Path(path)
    try:
        if p.is_dir():
            raise SpecError(option, f"{p} is a directory", "give a file path")
        if p.exists() and not p.is_file():
            raise SpecError(option, f"{p} exists and is not a regular file", "give a file path")
        if not p.parent.is_dir():
            raise SpecError(option, f"directory {p.parent} does not exist", "create it first or write elsewhere")
        fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=_tmp_prefix(p), suffix=".tmp")
        os.close(fd)
        os.unlink(tmp)
        if len(p.name.encode()) > os.pathconf(p.parent, "PC_NAME_MAX"):
            raise OSError(errno.ENAMETOOLONG, "File name too long")
    except OSError as e:
        raise SpecError(option, f"cannot write {str(p)[:200]}: {e.strerror or e}",
                        "choose a path in a writable directory") from None
    except ValueError as e:              # a NUL byte in the name
        raise SpecError(option, f"is not a usable path ({e})", "give a file path") from None
    return p


def _identity(path: Path) -> tuple:
    """What makes two paths the same file: (device, inode) when it exists, else the resolved path."""
    try:
        st = path.stat()
        return ("inode", st.st_dev, st.st_ino)
    except OSError:
        return ("path", str(path.resolve()))


CHECKPOINT_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                    "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt")


def _checkpoint_file(name: str) -> bool:
    """A file a checkpoint directory is read from (an output elsewhere in it is harmless)."""
    return name in CHECKPOINT_FILES or name.endswith((".safetensors", ".safetensors.index.json"))


def check_distinct(outputs: dict[str, str | Path | None], inputs: dict[str, str | Path | None]) -> None:
    """Refuse outputs that are the same file as each other or as an input (same resolved path or
    same inode: hard links and symbolic links included), or that would replace a file an input
    directory (a checkpoint) is read from. Keys are the option names the message gives."""
    seen: dict[tuple, str] = {}
    for opt, p in inputs.items():
        if p is not None:
            seen.setdefault(_identity(Path(p)), opt)
    dirs = {opt: Path(p).resolve() for opt, p in inputs.items() if p is not None and Path(p).is_dir()}
    for opt, p in outputs.items():
        if p is None:
            continue
        path = Path(p)
        key = _identity(path)
        other = seen.get(key) or seen.get(("path", str(path.resolve())))
        if other is not None:
            what = "an input" if other in inputs else "another output"
            raise SpecError(opt, f"{path} is the same file as {other} ({what}): writing it would destroy it",
                            f"give {opt} a path of its own")
        for dopt, d in dirs.items():
            if path.exists() and path.resolve().parent == d and _checkpoint_file(path.name):
                raise SpecError(opt, f"{path} is a file of {dopt} ({d})", "write the output elsewhere")
        seen[key] = opt
        seen[("path", str(path.resolve()))] = opt


class LineWriter:
    """JSON lines appended as each is ready, each line whole on disk or not at all.

    Opening takes an exclusive lock (a second run writing the same file is refused, not interleaved)
    and then empties the file. A write that fails part-way (a full disk, an interrupt) is cut back to
    the last whole line; `lines` counts the lines on disk."""

    def __init__(self, path: str | Path, option: str):
        self.path, self.option = Path(path), option
        self.lines = 0
        self._end = 0
        try:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
        except OSError as e:
            raise SpecError(option, f"cannot open {self.path}: {e.strerror or e}", "choose another path") from None
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self._fd)
            raise SpecError(option, f"{self.path} is being written by another run", "give each run its own file") \
                from None
        os.ftruncate(self._fd, 0)

    def write_line(self, text: str) -> None:
        data = (text.rstrip("\n") + "\n").encode("utf-8", "surrogatepass")
        try:
            view = memoryview(data)
            while view:
                n = write_some(self._fd, view)
                view = view[n:]
        except BaseException:
            self._cut()
            raise
        self._end += len(data)
        self.lines += 1

    def _cut(self) -> None:
        try:
            os.ftruncate(self._fd, self._end)
        except OSError:
            pass

    def close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            try:
                os.close(fd)         # unbuffered: nothing is left to flush, so closing cannot fail half-way
            except OSError:
                pass


def write_some(fd: int, data: memoryview) -> int:
    """os.write: the one place a LineWriter's bytes reach the file (tests replace it to fill a disk)."""
    return os.write(fd, data)
