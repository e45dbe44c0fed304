"""The processes vLLM starts end with ppl-eval, even when ppl-eval is ended by kill -9.

vLLM's workers watch their parent, the engine core, but the engine core does not watch the process
that started it (vLLM #55510): after a kill -9 or the OOM killer ends ppl-eval, the engine core and
its workers live on holding the GPUs, and the next run finds no memory for its KV cache. So before
vLLM starts, ppl-eval starts a watchdog: a small process that notes what ppl-eval starts from then
until the engine is up (the engine core, a local Ray cluster) and everything those start, and, when
ppl-eval is gone however it ended (its end of a pipe closes), ends those still running: SIGTERM
(vLLM's engine core shuts its workers down), then SIGKILL after GRACE_S. An engine shut down
cleanly stands it down. It needs psutil, which vLLM depends on.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

GRACE_S = 10  # seconds between SIGTERM and SIGKILL for what ppl-eval left running
POLL_S = 0.5  # how often the watchdog notes new processes while the engine starts (ten times less often afterwards)

WATCHDOG = r"""
import os, select, signal, sys
import psutil

signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C, a scheduler's SIGTERM reach the whole process group:
signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the watchdog outlives ppl-eval, to end what it leaves
parent, grace, poll = psutil.Process(int(sys.argv[1])), float(sys.argv[2]), float(sys.argv[3])
before = {p.pid for p in parent.children()}  # the parent's own (this one included), not the engine's
print("ready", flush=True)
roots, seen, said = {}, {}, b""
while True:
    ready, _, _ = select.select([0], [], [], poll if b"started" not in said else 10 * poll)  # woken at once when the pipe closes
    chunk = os.read(0, 64) if ready else None
    if chunk == b"":
        break  # the parent is gone, however it ended
    said += chunk or b""
    if b"done" in said:
        sys.exit(0)  # the engine was shut down: nothing to end
    try:
        if b"started" not in said:  # until the engine is up, what the parent starts is the engine's
            roots.update({p.pid: p for p in parent.children() if p.pid not in before})
        for root in list(roots.values()):
            for p in [root, *root.children(recursive=True)]:
                seen.setdefault(p.pid, p)  # a psutil.Process knows its start time: a reused pid is never signalled
    except psutil.Error:
        pass
left = [p for p in seen.values() if p.is_running()]
for p in left:
    try:
        p.terminate()
    except psutil.Error:
        pass
_, left = psutil.wait_procs(left, timeout=grace)
for p in left:
    try:
        p.kill()
    except psutil.Error:
        pass
"""


class Watchdog:
    """Started before an engine; started() once it is up, done() once it is shut down."""

    def __init__(self):
        self.process = None
        if importlib.util.find_spec("psutil") is None:
            return
        command = [sys.executable, "-c", WATCHDOG, str(os.getpid()), str(GRACE_S), str(POLL_S)]
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        if self.process.stdout.readline() != b"ready\n":  # it noted the parent's own children before the engine starts
            self.process.wait()
            self.process = None

    def started(self) -> None:
        self.say(b"started")

    def done(self) -> None:
        """Stand down: the engine's processes ended cleanly."""
        if self.say(b"done"):
            self.process.stdin.close()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        self.process = None

    def say(self, word: bytes) -> bool:
        if self.process is None:
            return False
        try:
            self.process.stdin.write(word)
            self.process.stdin.flush()
            return True
        except OSError:  # it exited (it could not start, or was killed): nothing to say
            return False


KEPT: list[Watchdog] = []  # the watchdogs of engines handed to a caller (load(engine="vllm")): kept for the process's life
