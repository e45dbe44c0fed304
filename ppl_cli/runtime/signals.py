"""SIGINT and SIGTERM stop a run at the engine's next check (between layers, head chunks, requests);
a second signal stops it at once. The first is acknowledged on stderr at once."""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager


class Interrupted(Exception):
    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


class StopRequest:
    signum: int | None = None

    def check(self) -> None:
        """Raise Interrupted if a signal asked the run to stop."""
        if self.signum is not None:
            raise Interrupted(self.signum)


@contextmanager
def stop_signals() -> Iterator[StopRequest]:
    stop = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield stop  # signal handlers can only be set from the main thread
        return

    def handler(signum, frame):
        if stop.signum is not None:
            raise KeyboardInterrupt
        stop.signum = signum
        logging.getLogger("ppl_cli").info("stopping on %s: saving the documents finished so far (again to stop at once)", signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
