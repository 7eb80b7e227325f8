"""Reading an adapter directory for the server: resolved, checked, and opened as checked.

A server loads adapters again and again (after each LRU eviction) from directories other people can write.
Each read therefore resolves the directory and its two files (symlinks followed) *at that moment*, lets the
caller check the resolved paths (`check`), and then opens exactly those paths, one component at a time with
O_NOFOLLOW: if anything on the way was swapped for a symlink since it was resolved, the open fails instead of
following it. The bytes read are what gets loaded (`io.files.adapter_from_bytes`, then `io.prepare_adapter`),
so nothing outside the checked paths is ever read.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path

from lorakit.io.files import CONFIG_NAME, WEIGHTS_NAME, AdapterFileError

FILES = (CONFIG_NAME, WEIGHTS_NAME)


class AdapterAccessError(PermissionError):
    """A directory outside the adapter root (or HTTP loading is off), or one that changed while it was read."""


def read_checked(directory: Path, check: Callable[[Path, str], None] | None = None) -> dict[str, bytes]:
    """{file name: bytes} of the adapter in `directory` (config and weights).

    Args:
        directory: the adapter directory (resolved again here).
        check: called with each resolved path (the directory, then each file) and how to show it; raises
            to refuse it (e.g. `AdapterAccessError` for a path outside a root).
    Raises:
        AdapterFileError: a file is missing, not a regular file, or (adapter_model.bin only) a pickle.
        AdapterAccessError: a path component turned into a symlink between resolving and opening.
    """
    real = Path(os.path.realpath(directory))
    if check is not None:
        check(real, str(directory))
    if not real.is_dir():
        raise AdapterFileError(
            f"{directory}: not an adapter directory (it does not exist or is not a directory)"
        )
    out = {}
    for name in FILES:
        file = Path(os.path.realpath(real / name))
        if not file.exists():
            if name == WEIGHTS_NAME and (real / "adapter_model.bin").exists():
                raise AdapterFileError(
                    f"{real / 'adapter_model.bin'}: pickle files are never loaded (they can run code); "
                    f"convert it to {WEIGHTS_NAME} in a trusted environment"
                )
            raise AdapterFileError(
                f"{real / name}: missing; an adapter directory holds {' and '.join(FILES)}"
            )
        if check is not None:
            check(file, f"{directory}/{name}")
        out[name] = _read_nofollow(file)
    return out


def _read_nofollow(path: Path) -> bytes:
    """The bytes of the regular file at the resolved `path`, opened without following any symlink."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open("/", os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        for i, part in enumerate(path.parts[1:]):
            last = i == len(path.parts) - 2
            try:
                # O_NONBLOCK on the file: a FIFO planted in its place must not block the engine thread forever.
                kind = getattr(os, "O_NONBLOCK", 0) if last else getattr(os, "O_DIRECTORY", 0)
                nxt = os.open(part, flags | kind, dir_fd=fd)
            except OSError as err:  # ELOOP / ENOTDIR: swapped for a symlink (or a file) after it was resolved
                raise AdapterAccessError(
                    f"{path}: changed while it was being opened ({err.strerror})"
                ) from None
            os.close(fd)
            fd = nxt
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise AdapterFileError(f"{path}: not a regular file")
        with os.fdopen(os.dup(fd), "rb") as f:
            return f.read()
    finally:
        os.close(fd)
