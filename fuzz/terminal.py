"""What a campaign shows while it runs: one live progress line, rewritten in
place on a terminal and printed every ``every_s`` seconds elsewhere (a CI
log), with lasting lines (findings) printed above it."""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from typing import TextIO


class ProgressLine:
    def __init__(
        self, render: Callable[[], str], stream: TextIO | None = None, live: bool | None = None, every_s: float = 30.0
    ) -> None:
        self.render = render
        self.stream = stream or sys.stdout
        self.live = self.stream.isatty() if live is None else live
        self.every_s = 1.0 if self.live else every_s
        self._lock = threading.Lock()
        self._shown = False
        self._stopped = threading.Event()
        self._ticker = threading.Thread(target=self._tick, daemon=True, name="fsdp-fuzz-progress")

    def __enter__(self) -> ProgressLine:
        self._ticker.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stopped.set()
        self._ticker.join()
        with self._lock:
            self._clear()

    def note(self, text: str) -> None:
        """A line that stays: above the live line on a terminal."""
        with self._lock:
            self._clear()
            self.stream.write(text + "\n")
            self.stream.flush()
            self._draw()

    def _tick(self) -> None:
        while not self._stopped.wait(self.every_s):
            with self._lock:
                if self.live:
                    self._draw()
                else:
                    self.stream.write(self.render() + "\n")
                self.stream.flush()

    def _draw(self) -> None:
        if self.live:
            self.stream.write("\r\x1b[K" + self.render())
            self._shown = True

    def _clear(self) -> None:
        if self.live and self._shown:
            self.stream.write("\r\x1b[K")
            self._shown = False
