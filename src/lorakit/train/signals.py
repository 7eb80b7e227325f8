"""Stopping the loop cleanly (Ctrl-C / SIGTERM) and the silent stream of the ranks that do not print."""

from __future__ import annotations

import signal
import threading


class _Silent:
    """A stream for the ranks that do not print."""

    def write(self, text: str) -> None:
        pass

    def flush(self) -> None:
        pass


class _StopSignal:
    """Ctrl-C (SIGINT) or SIGTERM asks the loop to stop after the current step, which then checkpoints.

    A second Ctrl-C interrupts at once. Handlers are only installed from the main thread.
    """

    requested = False

    def __enter__(self):
        self.previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
