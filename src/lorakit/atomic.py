"""All-or-nothing writes: every file and directory lorakit saves goes through here.

Under `kill -9` at any instant a reader sees the complete old content or the complete new one, never a mix:

    write_text(path, text)          one small file: a temporary sibling, then os.replace
    save_figure(fig, path)          the same for a matplotlib PNG
    write_dir(target, fill)         a whole directory (a merged model, a checkpoint): built under a temporary
                                    sibling, then renamed in, or swapped with the old one in one atomic step
    replace_files(dir, fill)        several files inside a directory that holds other things too (an adapter
                                    in a run's output): one commit rename, then the files move in (a journal
                                    that the next save finishes, and `resolve` reads through meanwhile)

Temporaries are named `.NAME.tmp-HOST-PID-TOKEN`: the next write of NAME removes those whose process is dead
(on this host), so killed saves do not pile up, and never one that a live process may still be filling.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import secrets
import shutil
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path

COMMIT = ".lorakit-commit"  # replace_files' journal: a complete set of new files, not all moved in yet
STAGE = "lorakit-stage"  # replace_files' temporaries: `.lorakit-stage.tmp-HOST-PID-TOKEN`
LEGACY_AGE_S = 3600  # `.NAME.tmp-XXXXXXXX` (lorakit 0.1.0: no pid) are removed past this age


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Replace `path`'s content with `text` atomically. Returns the path."""
    path = Path(path)
    clean_stale(path.parent, path.name)
    tmp = path.parent / temp_name(path.name)
    try:
        tmp.write_text(text)
        _fsync(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def save_figure(fig, path: str | os.PathLike, **savefig_kwargs) -> Path:
    """Write a matplotlib figure as a PNG atomically (the parent folder is created). Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(path.parent, path.stem)
    tmp = path.parent / temp_name(path.stem, ".png")  # keeps the .png suffix matplotlib picks the format from
    try:
        fig.savefig(tmp, **savefig_kwargs)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_dir(target: str | os.PathLike, fill: Callable[[Path], None], overwrite: bool = False) -> Path:
    """Create (or with `overwrite` replace) the directory `target` with what `fill(tmp)` writes into `tmp`.

    `fill` writes into a temporary sibling; it is fsynced and renamed to `target` only when complete. An
    existing `target` is exchanged with the new directory in one atomic step (renameat2 RENAME_EXCHANGE on
    Linux, renamex_np RENAME_SWAP on macOS) and the old one deleted after, so `target` is at every instant
    the complete old or the complete new directory. On a filesystem without an atomic exchange the old one is
    renamed aside to `.NAME.old-...` first; the next write_dir of `target` puts it back if a kill left none.

    Returns:
        `target`.
    Raises:
        FileExistsError: `target` exists (and is not an empty directory) and `overwrite` is False.
        Whatever `fill` raises; `target` is then untouched.
    """
    target = Path(target)
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    _restore_aside(target)
    clean_stale(parent, target.name)
    tmp = parent / temp_name(target.name)
    tmp.mkdir()
    try:
        fill(tmp)
        follow_umask(tmp)  # safetensors' save_file writes 0600: give the tree what the umask gives new files
        _fsync_tree(tmp)
        if overwrite and target.exists():
            _swap_in(tmp, target)
        else:
            try:
                os.rename(tmp, target)  # replaces an empty directory, refuses anything else
            except OSError as err:
                if err.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
                    raise FileExistsError(f"{target} exists; not replacing it") from err
                raise
        _fsync_dir(parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # after an exchange: the old directory
    return target


def replace_files(dir: str | os.PathLike, fill: Callable[[Path], None]) -> Path:
    """Replace the files `fill(stage)` writes into `stage` in `dir` as one transaction; other files stay.

    The files (flat, no sub-directories) are written and fsynced in a temporary folder inside `dir`, which is
    then renamed to `dir/.lorakit-commit`: that rename is the commit. The files are then moved to their
    places and the folder removed. A kill before the commit leaves the old files; a kill after leaves the
    journal, which `resolve` reads through (so a reader sees all the new files) and the next replace_files or
    `recover` finishes.

    Returns:
        `dir`.
    """
    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    recover(dir)
    clean_stale(dir, STAGE)
    stage = dir / temp_name(STAGE)
    stage.mkdir()
    try:
        fill(stage)
        for f in stage.iterdir():
            if not f.is_file() or f.is_symlink():
                raise ValueError(
                    f"replace_files: {f.name!r} is not a plain file; only flat files are replaced"
                )
            follow_umask(f)
        _fsync_tree(stage)
        for _ in range(100):
            try:
                os.rename(stage, dir / COMMIT)  # the commit point (an empty leftover journal is replaced)
                break
            except OSError as err:
                if err.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
                recover(dir)  # another save committed meanwhile: finish it, then commit ours after it
        else:
            raise RuntimeError(f"{dir}: could not commit a save (another process keeps committing)")
        _fsync_dir(dir)
        recover(dir)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return dir


def recover(dir: str | os.PathLike) -> None:
    """Finish a replace_files that a kill interrupted after its commit (a no-op when there is none)."""
    journal = Path(dir) / COMMIT
    if journal.is_symlink() or not journal.is_dir():
        return
    for name in sorted(os.listdir(journal)):
        try:
            os.replace(journal / name, Path(dir) / name)
        except FileNotFoundError:
            pass  # another process moved it first
    _fsync_dir(Path(dir))
    try:
        journal.rmdir()
    except OSError:
        pass  # gone already, or a newer commit took its place


def resolve(dir: str | os.PathLike, name: str) -> Path:
    """Where file `name` of `dir` is as of the last committed replace_files (inside an unfinished journal,
    else in `dir`). Reads only: a reader never writes. A journal that is a symlink is ignored."""
    journal = Path(dir) / COMMIT
    candidate = journal / name
    if not journal.is_symlink() and not candidate.is_symlink() and candidate.is_file():
        return candidate
    return Path(dir) / name


def temp_name(base: str, suffix: str = "") -> str:
    """`.BASE.tmp-HOST-PID-TOKEN[suffix]`: unique, and says which process on which host owns it."""
    return f".{base}.tmp-{_host()}-{os.getpid()}-{secrets.token_hex(4)}{suffix}"


def clean_stale(parent: str | os.PathLike, base: str | None = None) -> list[Path]:
    """Delete the temporaries of `base` (of any name when None) in `parent` left by killed processes.

    Only lorakit's own names are touched: `.BASE.tmp-HOST-PID-TOKEN` and `.BASE.old-HOST-PID-TOKEN` whose
    HOST is this one and whose PID is no longer running, and `.BASE.tmp-XXXXXXXX` (lorakit 0.1.0's names,
    no pid) untouched for more than an hour. Anything a live process may own is left alone.

    Returns:
        The paths deleted.
    """
    removed = []
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return removed
    for entry in entries:
        m = re.fullmatch(r"\.(.+)\.(tmp|old)-([^.]+(?:\.\w+)?)", entry.name)
        if m is None or (base is not None and m.group(1) != base) or not _is_stale(entry, m.group(3)):
            continue
        path = Path(entry.path)
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def _is_stale(entry: os.DirEntry, rest: str) -> bool:
    parts = rest.split("-")
    if len(parts) == 3 and re.fullmatch(r"[0-9a-f]{8}(\.\w+)?", parts[2]) and parts[1].isdigit():
        return parts[0] == _host() and not _alive(int(parts[1]))
    if re.fullmatch(r"[a-z0-9_]{8}", rest):  # tempfile.mkdtemp's suffix, as lorakit 0.1.0 named them
        try:
            return time.time() - entry.stat(follow_symlinks=False).st_mtime > LEGACY_AGE_S
        except OSError:
            return False
    return False


def _alive(pid: int) -> bool:
    if os.name != "posix":
        return True  # no cheap liveness check: never delete
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def _host() -> str:
    # '-' and '.' delimit the fields of a temporary's name, so the host name keeps only [A-Za-z0-9_].
    return re.sub(r"[^A-Za-z0-9]", "_", socket.gethostname())[:40] or "host"


def _restore_aside(target: Path) -> None:
    """Undo a write_dir fallback swap that a kill cut between its two renames (old renamed aside, new not in)."""
    if target.exists() or target.is_symlink():
        return
    prefix = f".{target.name}.old-"
    asides = sorted(
        (p for p in target.parent.glob(f"{prefix}*") if p.is_dir() and _is_stale_aside(p, prefix)),
        key=lambda p: p.stat().st_mtime,
    )
    if asides:
        os.rename(asides[-1], target)


def _is_stale_aside(path: Path, prefix: str) -> bool:
    parts = path.name[len(prefix) :].split("-")
    return len(parts) == 3 and parts[0] == _host() and parts[1].isdigit() and not _alive(int(parts[1]))


def _swap_in(new: Path, target: Path) -> None:
    """Put directory `new` at `target`, leaving the old `target` at `new` (to be deleted by the caller)."""
    if _exchange(new, target):
        return
    aside = target.parent / temp_name(target.name).replace(".tmp-", ".old-", 1)
    os.rename(target, aside)
    os.rename(new, target)  # a kill just before this leaves `aside`: _restore_aside puts it back
    os.rename(aside, new)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically exchange two paths; False where the platform or filesystem cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if sys.platform.startswith("linux") and hasattr(libc, "renameat2"):
            at_fdcwd, rename_exchange = -100, 2
            rc = libc.renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
        elif sys.platform == "darwin" and hasattr(libc, "renamex_np"):
            rc = libc.renamex_np(os.fsencode(a), os.fsencode(b), 0x2)  # RENAME_SWAP
        else:
            return False
    except OSError:
        return False
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    if os.name != "posix":
        return
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on a directory
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = Path(dirpath) / f
            if not p.is_symlink():
                _fsync(p)
        _fsync_dir(Path(dirpath))


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
