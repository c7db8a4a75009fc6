"""Progress of the long stages as bars on the driver's console, whatever runs them.

Loops on the driver wrap their work in `bar(...)` (tqdm). Loops on Ray Train workers call
`report_progress(stage, done)` on rank 0, which reaches the driver through a small named actor:
`watch(stage, total)` around `trainer.fit()` draws that stage's bar. So the console can show every
stage's progress while the workers' own logs stay in Ray's log files (`init_ray(log_to_driver=False)`).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

import ray
from tqdm import tqdm

BOARD_NAME = "pathalign-progress"


def bar(total: int, stage: str, unit: str = "it", iterable=None) -> tqdm:
    """A console progress bar for a loop on the driver: `with bar(n, "sampling", "img") as b: ... b.update(k)`,
    or `for x in bar(len(xs), "judging", iterable=xs)`."""
    return tqdm(iterable, total=total, desc=stage, unit=unit, dynamic_ncols=True, leave=True)


@ray.remote(num_cpus=0)
class _ProgressBoard:
    """The latest (done, postfix) of each stage that workers report."""

    def __init__(self) -> None:
        self.stages: dict[str, tuple[int, str]] = {}

    def update(self, stage: str, done: int, postfix: str) -> None:
        self.stages[stage] = (done, postfix)

    def read(self, stage: str) -> tuple[int, str] | None:
        return self.stages.get(stage)


def report_progress(stage: str, done: int, postfix: str = "") -> None:
    """From a worker: `done` units of `stage` finished. Does nothing when no driver watches.

    The board is looked up on every call (a name lookup, well under a step's time): each watch may
    start a new one, and a handle kept from an earlier one would report to an actor that is gone.
    """
    try:
        board = ray.get_actor(BOARD_NAME, namespace=BOARD_NAME)
    except ValueError:
        return
    board.update.remote(stage, done, postfix)


@contextlib.contextmanager
def watch(stage: str, total: int, unit: str = "step", every_s: float = 0.5, flush_s: float = 5.0) -> Iterator[None]:
    """On the driver, around work that calls report_progress(stage, ...) on some worker: draw its bar.

    Workers' reports are fire-and-forget, so the last ones may still be on their way when the work
    returns: the bar waits up to flush_s for the stage to reach `total` before it closes.
    """
    board = _ProgressBoard.options(name=BOARD_NAME, namespace=BOARD_NAME, get_if_exists=True).remote()
    ray.get(board.update.remote(stage, 0, ""))  # a stage watched before starts again, before any new report lands
    stop = threading.Event()

    def draw() -> None:
        with bar(total, stage, unit) as shown:
            drawn, deadline = None, None
            while True:
                stopping = stop.wait(every_s)
                latest = ray.get(board.read.remote(stage))
                if latest is not None and latest != drawn:
                    shown.set_postfix_str(latest[1], refresh=False)
                    shown.update(latest[0] - shown.n)
                    drawn = latest
                if stopping:
                    deadline = deadline or time.monotonic() + flush_s
                    if shown.n >= total or time.monotonic() > deadline:
                        return

    thread = threading.Thread(target=draw, name=f"progress {stage}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
