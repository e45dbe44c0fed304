"""The watchdog ends what an engine started once its parent is killed, and nothing else.

A parent process stands in for ppl-eval: it has a child of its own, starts a watchdog, starts an
"engine" (a process that starts another, as vLLM's engine core starts its workers), and is then
killed with SIGKILL or stands the watchdog down.
"""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

psutil = pytest.importorskip("psutil")

PARENT = textwrap.dedent(
    """
    import subprocess, sys, time
    from ppl_cli.engine.watchdog import Watchdog

    own = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    watchdog = Watchdog()
    engine = subprocess.Popen([sys.executable, "-c", "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); time.sleep(120)"])
    time.sleep(1.5)  # the watchdog notes the engine and its worker
    watchdog.started()
    later = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    guard = watchdog.process.pid
    if sys.argv[1] == "done":  # as if the engine had been shut down
        watchdog.done()
    print(own.pid, engine.pid, later.pid, guard, flush=True)
    time.sleep(120)
    """
)


def run_parent(how: str) -> tuple[subprocess.Popen, dict[str, psutil.Process]]:
    parent = subprocess.Popen([sys.executable, "-c", PARENT, how], stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": os.getcwd()})
    own, engine, later, watchdog = (int(pid) for pid in parent.stdout.readline().split())
    engine = psutil.Process(engine)
    processes = {"own": psutil.Process(own), "engine": engine, "worker": engine.children()[0], "later": psutil.Process(later)}
    return parent, processes, watchdog


def running(p) -> bool:
    return p is not None and p.is_running() and p.status() != psutil.STATUS_ZOMBIE


def wait_until_gone(processes, seconds: float) -> None:
    deadline = time.time() + seconds
    while any(running(p) for p in processes) and time.time() < deadline:
        time.sleep(0.1)


def test_kill_9_of_the_parent_ends_the_engine_and_its_workers_only():
    parent, processes, _ = run_parent("kill")
    try:
        assert running(processes["engine"]) and running(processes["worker"])
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
        wait_until_gone([processes["engine"], processes["worker"]], 10)
        assert not running(processes["engine"]) and not running(processes["worker"])
        assert running(processes["own"]) and running(processes["later"])  # started before the watchdog, or after the engine was up
    finally:
        for p in processes.values():
            if running(p):
                p.kill()


def test_an_engine_shut_down_stands_the_watchdog_down():
    """done(): the watchdog exits, and what it watched is left alone when the parent is killed later."""
    parent, processes, watchdog = run_parent("done")
    try:
        assert not psutil.pid_exists(watchdog) or psutil.Process(watchdog).status() == psutil.STATUS_ZOMBIE
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
        time.sleep(1.5)
        assert all(running(p) for p in processes.values())
    finally:
        for p in processes.values():
            if running(p):
                p.kill()
