"""One progress display for the commands that work for a while (train, compare, probe).

On a terminal it is a tqdm bar with an ETA, its postfix saying what is being done. Off a
terminal (a log file, a pipe, CI) a bar's redraws would be noise, so it prints plain lines
on stderr instead: the caller's own (:meth:`Progress.line`, e.g. one per epoch or per
finished run) and, for work measured as a fraction of a total, a status line every
``every`` seconds (:meth:`Progress.update`).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any


class Progress:
    """A bar on a terminal, lines elsewhere; silent when not ``enabled``.

    Args:
        name: the bar's default label and the prefix of :meth:`update`'s status lines.
        enabled: ``False`` prints nothing at all.
        bar: ``None`` = a bar when stderr is a terminal; ``True`` = always; ``False`` = never.
        every: seconds between :meth:`update`'s status lines when there is no bar (``None``:
            no such lines).
        remaining: how :meth:`update`'s status lines write the units left (default ``str``).
        unit, smoothing, bar_format: passed to tqdm.
    """

    def __init__(
        self,
        name: str,
        *,
        enabled: bool = True,
        bar: bool | None = None,
        every: float | None = None,
        remaining: Callable[[float], str] = str,
        unit: str = "it",
        smoothing: float = 0.3,
        bar_format: str | None = None,
    ) -> None:
        self.name = name
        self.enabled = enabled
        self.bar_mode = enabled and (bar is True or (bar is None and sys.stderr.isatty()))
        self.every = every
        self.remaining = remaining
        self.tqdm_args: dict[str, Any] = {"unit": unit, "smoothing": smoothing, "bar_format": bar_format}
        self.bar: Any = None
        self.last = time.perf_counter()

    @property
    def showing_bar(self) -> bool:
        """Whether a bar is open (callers skip work, such as host syncs, only a bar shows)."""
        return self.bar is not None

    def start(self, total: float, desc: str | None = None) -> None:
        """Open a bar of ``total`` units (closing one still open); nothing without a bar."""
        self.close()
        if self.bar_mode:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc or self.name, file=sys.stderr, leave=True, **self.tqdm_args)

    def advance(self, n: float = 1, postfix: dict[str, Any] | str | None = None) -> None:
        """``n`` more units done; ``postfix`` (when given) replaces what the bar shows after it."""
        if self.bar is None:
            return
        if isinstance(postfix, str):
            self.bar.set_postfix_str(postfix, refresh=False)
        elif postfix:
            self.bar.set_postfix(postfix, refresh=False)
        self.bar.update(n)

    def update(self, done: float, total: float, status: str) -> None:
        """``done`` of ``total`` units are done (both may move: estimates change). A bar
        shows it with its ETA; without one, a line every ``every`` seconds says ``status``
        and how much is left."""
        if not self.enabled:
            return
        if self.bar_mode:
            if self.bar is None:
                self.start(max(total, 1e-9))
            self.bar.total = max(total, done, 1e-9)
            self.bar.n = done
            self.bar.set_postfix_str(status, refresh=False)
            self.bar.refresh()
        elif self.every is not None and time.perf_counter() - self.last >= self.every:
            self.last = time.perf_counter()
            left = max(total - done, 0.0)
            self.line(f"{self.name}: {status}; about {self.remaining(left)} left")

    def line(self, text: str) -> None:
        """Print ``text`` on its own line (above an open bar, which stays)."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
