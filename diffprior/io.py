"""Atomic file writes: every file diffprior writes (weights, metadata, tables, results, figures)
goes through :func:`write_atomically`, so a reader never sees a half-written file, even when
the writer is killed mid-write.

Examples
--------
>>> import os, tempfile
>>> from diffprior.io import write_text
>>> path = os.path.join(tempfile.mkdtemp(), "table.md")
>>> write_text(path, "| a |\\n")
>>> open(path).read()
'| a |\\n'
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["check_writable", "write_atomically", "write_text", "write_json"]


def check_writable(path: str | os.PathLike) -> None:
    """Raise a ValueError saying why, if :func:`write_atomically` could not write ``path``
    where it is: ``path`` is a directory, lies under a regular file, or its nearest existing
    directory cannot be written. Nothing is created; call it before long work whose result
    goes to ``path``.

    >>> import tempfile
    >>> folder = tempfile.mkdtemp()
    >>> check_writable(os.path.join(folder, "new", "samples.npz"))  # fine: folders are made
    >>> try:
    ...     check_writable(folder)
    ... except ValueError as err:
    ...     print(str(err).replace(folder, "FOLDER"))
    FOLDER is a directory; expected the path of a file to write
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a directory; expected the path of a file to write")
    # write_atomically creates the missing directories: look at the nearest existing one
    existing = path.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(
            f"{path} lies under {existing}, which is a file, not a directory; expected the path "
            "of a file in a directory"
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{path} cannot be written: no write permission in directory {existing}")


def write_atomically(path: str | os.PathLike, write: Callable[[str], Any]) -> None:
    """Call ``write(temporary_path)``, then rename the temporary file onto ``path``.

    The temporary file lives in the target's directory (created if missing), so the rename is
    atomic; it gets the mode a plain ``open()`` would give, and it is removed if ``write``
    fails.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=path.suffix)
    os.close(handle)
    try:
        write(temporary)
        umask = os.umask(0)  # mkstemp files are private (0600); use open()'s mode
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    write_atomically(path, lambda name: Path(name).write_text(text, encoding="utf-8"))


def write_json(path: str | os.PathLike, record: Any) -> None:
    """Write ``record`` as indented JSON to ``path`` atomically."""
    write_text(path, json.dumps(record, indent=2) + "\n")
