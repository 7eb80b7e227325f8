"""Real `kill -9` of a forked process at chosen or random moments of a save (test helper, POSIX only).

`kill_at_rename(work, k)` forks; the child runs `work()` with every os.rename / os.replace pausing first
until the parent says go; the parent SIGKILLs the child just before its k-th rename. Every state a save can
leave on disk lies between two renames, so k = 1, 2, ... K+1 visits all of them (k = K+1: the save completed).
`kill_after(work, seconds)` kills at a wall-clock moment instead, wherever the child is.
"""

from __future__ import annotations

import os
import select
import signal
import time


def kill_at_rename(work, k: int, timeout: float = 60.0) -> bool:
    """Run `work` in a forked child, SIGKILL it before its k-th rename (os.rename, os.replace, and
    lorakit.atomic's directory exchange). Returns True when it was killed, False when `work` finished (or
    died) before its k-th rename."""
    ev_r, ev_w = os.pipe()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 0
        try:
            os.close(ev_r)
            os.close(go_w)
            real = {"rename": os.rename, "replace": os.replace}

            def hooked(name):
                def call(*args, **kwargs):
                    os.write(ev_w, b"r")
                    os.read(go_r, 1)
                    return real[name](*args, **kwargs)

                return call

            import lorakit.atomic as atomic

            os.rename, os.replace = hooked("rename"), hooked("replace")
            if hasattr(atomic, "_exchange"):
                real["exchange"] = atomic._exchange
                atomic._exchange = hooked("exchange")
            work()
            os.write(ev_w, b"d")
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    os.close(ev_w)
    os.close(go_r)
    done, killed = 0, False
    try:
        while True:
            ready, _, _ = select.select([ev_r], [], [], timeout)
            if not ready:
                raise TimeoutError("the child made no progress")
            event = os.read(ev_r, 1)
            if event != b"r":
                break  # finished ("d") or died (EOF)
            if done + 1 == k:
                os.kill(pid, signal.SIGKILL)
                killed = True
                break
            done += 1
            os.write(go_w, b"g")
    finally:
        _reap(pid)
        os.close(ev_r)
        os.close(go_w)
    return killed


def kill_after(work, seconds: float) -> bool:
    """Run `work` (forever, typically a save loop) in a forked child; SIGKILL it after `seconds`."""
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            work()
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    time.sleep(seconds)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    _reap(pid)
    return True


def _reap(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    os.waitpid(pid, 0)
