"""Atomic writes of small files: a temporary file beside the target, then os.replace.

A reader (or a killed run) sees the old file or the new one, never a half-written one. Adapter and checkpoint
directories have their own multi-file versions (io/files.py, train/checkpoint.py).
"""

from __future__ import annotations

import os
from pathlib import Path


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Replace `path`'s content with `text` atomically. Returns the path."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def save_figure(fig, path: str | os.PathLike, **savefig_kwargs) -> Path:
    """Write a matplotlib figure as a PNG atomically (the parent folder is created). Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.png")  # keeps the .png suffix matplotlib picks the format from
    try:
        fig.savefig(tmp, **savefig_kwargs)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def umask() -> int:
    """The process's file mode creation mask (read without changing it where /proc allows)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    old = os.umask(0o022)  # elsewhere: set and restore (a brief window other threads could observe)
    os.umask(old)
    return old


def follow_umask(path: str | os.PathLike) -> None:
    """Give `path` (a file, or a directory and everything inside it) the modes a plain open() / mkdir would:
    0o666 / 0o777 minus the umask (0644 / 0755 under umask 022).

    Why: safetensors' save_file writes through a temporary file created 0600, and tempfile.mkdtemp makes 0700
    directories; renamed into place, they would stay unreadable to a teammate or a serving user.
    """
    mask = umask()
    path = Path(path)
    if path.is_dir():
        os.chmod(path, 0o777 & ~mask)
        for sub in path.rglob("*"):
            if not sub.is_symlink():
                os.chmod(sub, (0o777 if sub.is_dir() else 0o666) & ~mask)
    else:
        os.chmod(path, 0o666 & ~mask)
