"""Files that several workers may write at once (a shared study's directions, its reproduce.json,
a GGUF's converted copy, the export every worker makes at its end): each writes under a temporary
name of its own, then moves it into place, so a reader sees the old file or the whole new one and
two writers never take each other's file."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

from .errors import HereticError


def write_atomically(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp)` on a fresh file beside `path`, then replace `path` with it.

    A fixed temporary name (`path + ".tmp"`) lets a second worker truncate or move the first's
    file between its write and its rename; a unique name cannot be touched by anyone else."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _unique_sibling(path)
    try:
        write(tmp)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def fill_directory_once(path: str | Path, fill: Callable[[Path], None]) -> Path:
    """Call `fill(tmp)` on a fresh folder beside `path` and move it to `path`; if another worker
    got there first, keep theirs (the same content) and drop ours."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _unique_sibling(path)
    tmp.mkdir()
    try:
        fill(tmp)
        tmp.rename(path)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not path.is_dir():  # not a lost race: a real failure
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def replace_directory(path: str | Path, write: Callable[[Path], None], tries: int = 3) -> Path:
    """Call `write(tmp)` to create a fresh folder beside `path`, then put it in place of `path`
    (an older export moved aside and removed). If another writer puts its folder there between our
    moving theirs aside and moving ours in, move it aside again: the last writer's folder stays."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _unique_sibling(path)
    try:
        write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for _ in range(tries):
        old = _unique_sibling(path)
        try:
            path.rename(old)
        except FileNotFoundError:  # nothing there yet
            pass
        try:
            tmp.rename(path)
            return path
        except OSError:
            if not path.exists():  # not another writer's folder in the way: a real failure
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        finally:
            shutil.rmtree(old, ignore_errors=True)
    shutil.rmtree(tmp, ignore_errors=True)
    raise HereticError(f"cannot move the new folder into {path}: other processes keep writing there")


def _unique_sibling(path: Path) -> Path:
    """A hidden name beside `path` that no other process picks (pid and a random part: workers on
    other machines may share the folder). Created by the caller, so it gets the usual permissions
    (a mkstemp file is private to its owner, which other users of a shared study could not read)."""
    return path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
