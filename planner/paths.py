"""Path tests that never raise: a user's string may be no file name at all (longer than the
filesystem allows, a NUL byte), and asking whether it names a file must then say no, not fail."""
from __future__ import annotations

import os
from pathlib import Path


def is_file(path: str | os.PathLike) -> bool:
    try:
        return Path(path).is_file()
    except (OSError, ValueError):
        return False


def is_dir(path: str | os.PathLike) -> bool:
    try:
        return Path(path).is_dir()
    except (OSError, ValueError):
        return False


def exists(path: str | os.PathLike) -> bool:
    try:
        return Path(path).exists()
    except (OSError, ValueError):
        return False
