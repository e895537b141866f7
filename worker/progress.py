"""Progress of long command-line work on stderr: one rewritten line in a terminal, else a line
every tenth of the way (so logs of scripted runs stay short)."""

from __future__ import annotations

import sys
import time


class Progress:
    """``Progress(total, "embedding")``; call :meth:`advance` as items finish."""

    def __init__(self, total: int, label: str) -> None:
        self.total, self.label, self.done = total, label, 0
        self.started = time.monotonic()
        self.tty = sys.stderr.isatty()
        self._next_line = 0

    def advance(self, n: int = 1) -> None:
        self.done = min(self.total, self.done + n)
        finished = self.done == self.total
        if not self.tty and self.done < self._next_line and not finished:
            return
        self._next_line = self.done + max(1, self.total // 10)
        elapsed = time.monotonic() - self.started
        rate = self.done / elapsed if elapsed > 0 else 0.0
        eta = f", {(self.total - self.done) / rate:.0f} s left" if rate and not finished else ""
        line = f"{self.label}: {self.done}/{self.total} ({rate:.1f}/s{eta})"
        if self.tty:
            print(f"\r{line}\033[K", end="\n" if finished else "", file=sys.stderr, flush=True)
        else:
            print(line, file=sys.stderr, flush=True)
