"""Files that are either complete or absent: write under a temporary name in the same folder, then
rename (``os.replace`` is atomic on POSIX and Windows). A crash or an error mid-write leaves the
previous version and no temporary files."""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Union

__all__ = ["atomic_write", "atomic_dir"]


def atomic_write(target: Union[str, os.PathLike], write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)``, then move the file into ``target``; on any error the temporary file
    is removed and ``target`` is left as it was."""
    target = Path(target)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


@contextmanager
def atomic_dir(target: Union[str, os.PathLike]) -> Iterator[Path]:
    """Build a folder under a temporary name (yielded), then swap it in for ``target``: the old one is
    renamed to ``<target>.old`` and removed after the new one is in place, so a run killed in between
    still leaves a readable ``target`` or ``target.old``. On an error the temporary folder is removed
    and ``target`` is untouched."""
    target = Path(target)
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = target.with_name(target.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        os.replace(target, old)
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)
