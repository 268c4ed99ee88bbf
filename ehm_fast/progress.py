"""The trainer's progress on stderr: a tqdm bar on a terminal, a plain line every so many steps in
a file or a pipe (a bar there is a stream of carriage returns, 120 KB in 71 lines).

A stream that is closed or broken silences the output, never the run. Under
`ehm-train 2>&1 | tee log` the Ctrl-C that stops the trainer also ends tee, and the next write
fails with BrokenPipeError: `broken` then tells the trainer to stop cleanly (checkpoint first),
and the stream's descriptor is pointed at /dev/null so that nothing fails at exit either.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO, TypeVar

LINES_PER_RUN = 20  # plain lines a whole run prints, about

T = TypeVar("T")


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, OSError, ValueError):
        return False


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}" if m >= 60 else f"{m}:{s:02d}"


class Progress:
    """Progress of steps `initial`..`total`; `show` is called at log steps with short fields
    (name -> text). `enabled=False` (every process but rank 0) prints nothing."""

    def __init__(self, total: int, initial: int, *, log_every: int, prog: str, enabled: bool = True,
                 stream: TextIO | None = None) -> None:
        self.stream = sys.stderr if stream is None else stream
        self.total, self.initial, self.prog, self.enabled = total, initial, prog, enabled
        self.broken = False
        # A multiple of log_every: lines come from log steps, which carry the metrics.
        self.line_every = log_every * max(1, -(-total // (LINES_PER_RUN * log_every)))
        self._t0 = time.perf_counter()
        self._lines = 0
        self._on_terminal = enabled and _isatty(self.stream)
        self.bar: Any = None  # drawn at the first step, below any message printed before it

    def _guard(self, write: Callable[..., T], *args: Any, **kwargs: Any) -> T | None:
        """Runs `write`; a broken or closed stream makes this and every later output a no-op."""
        if self.broken or not self.enabled:
            return None
        try:
            return write(*args, **kwargs)
        except OSError:
            pass
        except ValueError:  # "I/O operation on closed file"
            if not getattr(self.stream, "closed", False):
                raise
        self.broken = True
        try:  # buffered text would fail again when the interpreter flushes it at exit
            os.dup2(os.open(os.devnull, os.O_WRONLY), self.stream.fileno())
        except (AttributeError, OSError, ValueError):
            pass
        return None

    def _write(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()

    def message(self, text: str) -> None:
        """One line of its own (not while a bar is drawn)."""
        self._guard(self._write, f"{self.prog}: {text}\n")

    def step(self) -> None:
        if not self._on_terminal:
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = self._guard(tqdm, total=self.total, initial=min(self.initial, self.total), dynamic_ncols=True,
                                   unit="step", file=self.stream)
        if self.bar is not None:
            self._guard(self.bar.update, 1)

    def show(self, step: int, fields: dict[str, str]) -> None:
        if self._on_terminal:
            if self.bar is not None:
                self._guard(self.bar.set_postfix, fields, refresh=False)
            return
        if self._lines and step % self.line_every and step != self.total:
            return
        self._lines += 1
        elapsed = time.perf_counter() - self._t0
        done = step - self.initial
        eta = f", eta {_clock(elapsed / done * (self.total - step))}" if 0 < done and step < self.total else ""
        values = ", ".join(f"{k} {v}" for k, v in fields.items())
        self.message(f"step {step}/{self.total} ({100 * step // max(self.total, 1)}%), {values}, "
                     f"{_clock(elapsed)} elapsed{eta}")

    def close(self) -> None:
        if self.bar is not None:
            self._guard(self.bar.close)
            self.bar = None
