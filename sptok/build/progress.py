"""Progress on stderr: a live line on a terminal, one log line every LOG_EVERY seconds otherwise."""

from __future__ import annotations

import sys
import time

LOG_EVERY = 10.0


def _human(n: float) -> str:
    for unit in ("", "k", "M", "G", "T"):
        if abs(n) < 1000:
            return f"{n:.0f}{unit}" if unit == "" else f"{n:.1f}{unit}"
        n /= 1000
    return f"{n:.1f}P"


class Progress:
    def __init__(self, total_bytes: int, total_units: int, quiet: bool = False, stream=None):
        self.total_bytes = max(1, total_bytes)
        self.total_units = total_units
        self.quiet = quiet
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.t0 = self.last = time.time()
        self.docs = self.tokens = self.bytes_done = self.units = 0

    def update(self, docs: int = 0, tokens: int = 0, nbytes: int = 0) -> None:
        """Add what was just done (increments, from any worker)."""
        self.docs += docs
        self.tokens += tokens
        self.bytes_done += nbytes
        self._show()

    def unit_done(self) -> None:
        self.units += 1
        self._show()

    def _show(self, force: bool = False) -> None:
        if self.quiet:
            return
        now = time.time()
        if self.tty and now - self.last < 0.2 and not force:
            return
        if not self.tty and now - self.last < LOG_EVERY and not force:
            return
        self.last = now
        elapsed = max(now - self.t0, 1e-6)
        done = min(self.bytes_done, self.total_bytes)
        frac = done / self.total_bytes
        eta = (elapsed / frac - elapsed) if frac > 0 else float("nan")
        msg = (f"units {self.units}/{self.total_units}  docs {_human(self.docs)}  tokens {_human(self.tokens)}  "
               f"{_human(self.tokens / elapsed)} tok/s  {_human(done)}B/{_human(self.total_bytes)}B  "
               f"{100 * frac:.0f}%  eta {eta:.0f}s")
        if self.tty:
            print("\r" + msg + "\x1b[K", end="", file=self.stream, flush=True)
        else:
            print(msg, file=self.stream, flush=True)

    def close(self) -> None:
        if self.quiet or not self.units:
            return
        if self.tty:
            print(file=self.stream)
        else:
            self._show(force=True)
