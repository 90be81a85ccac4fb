"""Progress lines for work that runs longer than a user waits in silence: done / total, rate and ETA, at most one
line per `every_s` seconds (issue 19: every phase over 30 s prints at least every 30 s)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import ray

EVERY_S = 20.0  # under the 30 s a phase may stay silent, with room for the work item that ends late
T = TypeVar("T")


def format_seconds(s: float) -> str:
    """`59s`, `1m 01s`."""
    minutes, seconds = divmod(int(round(s)), 60)
    return f"{minutes}m {seconds:02d}s" if minutes else f"{seconds}s"


def progress_line(what: str, done: int, total: int, elapsed_s: float, unit: str) -> str:
    """`eval: sampling 3/8 chunks (38%) 0.21 chunks/s eta 24s`; the ETA assumes the rate so far holds."""
    rate = done / elapsed_s if elapsed_s > 0 else 0.0
    eta = f" eta {format_seconds((total - done) / rate)}" if 0 < done < total else ""
    share = f" ({100 * done / total:.0f}%)" if total else ""
    return f"{what} {done}/{total} {unit}{share} {rate:.2f} {unit}/s{eta}"


class Ticker:
    """Calls `log(progress_line(...))` when `every_s` has passed since the last line (or the start)."""

    def __init__(self, log: Callable[[str], None], what: str, total: int, unit: str, every_s: float = EVERY_S):
        self.log, self.what, self.total, self.unit, self.every_s = log, what, total, unit, every_s
        self.start = self.last = time.perf_counter()

    def update(self, done: int) -> None:
        now = time.perf_counter()
        if now - self.last >= self.every_s and done < self.total:
            self.last = now
            self.log(progress_line(self.what, done, self.total, now - self.start, self.unit))


def get_with_progress(
    refs: Sequence[ray.ObjectRef], log: Callable[[str], None], what: str, unit: str, every_s: float = EVERY_S
) -> list[Any]:
    """`ray.get(refs)` in their order, with a progress line every `every_s` while some are still running."""
    ticker = Ticker(log, what, len(refs), unit, every_s)
    pending = list(refs)
    while pending:
        _, pending = ray.wait(pending, num_returns=len(pending), timeout=every_s)
        ticker.update(len(refs) - len(pending))
    return ray.get(list(refs))


def with_lines(fn: Callable[[], T], log: Callable[[str], None], what: str, every_s: float = EVERY_S) -> T:
    """fn() for one long step with no parts to count (an engine's start), run in a thread so that `log` gets
    `what (20s)`, `what (40s)`, ... every `every_s` seconds until it returns; its exception is raised here."""
    outcome: dict[str, Any] = {}

    def call() -> None:
        try:
            outcome["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
            outcome["error"] = e

    start = time.perf_counter()
    thread = threading.Thread(target=call, name=what, daemon=True)
    thread.start()
    while True:
        thread.join(every_s)
        if not thread.is_alive():
            break
        log(f"{what} ({format_seconds(time.perf_counter() - start)})")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]
