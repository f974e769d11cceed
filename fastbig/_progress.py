"""The one progress bar of the command line (``fastbig train``, ``fastbig bench``)."""
from __future__ import annotations

import sys
import time


class Progress:
    """A one-line progress bar on stderr (or ``stream``): ``[label] [####....] done/total [12s] text``.

    On a terminal it is redrawn in place, at most every ``min_interval`` seconds (and at the
    last step). Off a terminal (a log file) it writes ``lines="each"``: one line per update, or
    ``lines="last"``: one line when closed, so logs stay readable. ``clock`` shows the seconds
    since the bar started (``t0``). ``enabled=False`` writes nothing.
    """

    def __init__(self, total: int, label: str = "", *, enabled: bool = True, stream=None, width: int = 24,
                 lines: str = "each", clock: bool = True, min_interval: float = 0.0):
        if lines not in ("each", "last"):
            raise ValueError(f"Progress: lines must be 'each' or 'last', got {lines!r}")
        self.total, self.done, self.label, self.width = max(1, total), 0, label, width
        self.enabled, self.lines, self.clock, self.min_interval = enabled, lines, clock, min_interval
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.t0 = time.perf_counter()
        self._drawn = float("-inf")
        self._text = ""

    def _line(self, now: float) -> str:
        filled = int(self.done / self.total * self.width)
        parts = [self.label] if self.label else []
        parts.append(f"[{'#' * filled}{'.' * (self.width - filled)}] {self.done}/{self.total}")
        if self.clock:
            parts.append(f"{now - self.t0:5.0f}s")
        parts.append(self._text)
        return " ".join(parts)

    def update(self, text: str = "", advance: int = 0) -> None:
        """Advance by ``advance`` steps and show ``text`` after the bar."""
        self.done = min(self.total, self.done + advance)
        self._text = text
        if not self.enabled:
            return
        now = time.perf_counter()
        if self.tty:
            if now - self._drawn >= self.min_interval or self.done == self.total:
                self._drawn = now
                self.stream.write("\r\033[K" + self._line(now)[:160])
                self.stream.flush()
        elif self.lines == "each":
            self.stream.write(self._line(now) + "\n")
            self.stream.flush()

    def close(self) -> None:
        """End the bar's line; with ``lines="last"``, write it once more, complete."""
        if not self.enabled:
            return
        if self.lines == "last":
            self.done = self.total
            line = self._line(time.perf_counter())
            self.stream.write(("\r\033[K" + line + "\n") if self.tty else (line + "\n"))
        elif self.tty:
            self.stream.write("\n")
        self.stream.flush()
