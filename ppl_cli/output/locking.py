"""One writer per output: an exclusive OS lock (flock) that dies with its process, so a kill leaves nothing stale.

The lock file names its holder (process id, host, command) so that a second writer can say who
holds it. On a filesystem without working locks (some NFS and Lustre mounts) the lock cannot be
taken; the writer is warned once and goes on unprotected.
"""

from __future__ import annotations

import errno
import os
import socket
import sys
import warnings
from pathlib import Path

from ..config import public_url
from ..errors import EXIT_OUTPUT, PplError, PplWarning

LOCK_NAME = ".ppl-eval.lock"  # inside an output directory
UNSUPPORTED = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}  # the filesystem has no flock


class OutputLock:
    """An exclusive lock on `path` (a lock file), held from acquire() until release() or the process ends.

    `what` names the output in messages. `remove` deletes the lock file on release (for a lock
    beside a file output); a lock inside a run directory stays, empty of meaning once released.
    """

    def __init__(self, path: Path, what: str, remove: bool = False):
        self.path, self.what, self.remove = Path(path), what, remove
        self.fd: int | None = None

    def acquire(self) -> OutputLock:
        import fcntl

        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise PplError(f"cannot lock {self.what}: {e.strerror} ({self.path})", EXIT_OUTPUT) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = read_holder(fd)
                os.close(fd)
                raise PplError(
                    f"{self.what} is being written by another ppl-eval ({holder}); wait for it to finish or choose another output",
                    EXIT_OUTPUT,
                ) from None
            except OSError as e:
                os.close(fd)
                if e.errno in UNSUPPORTED:
                    warnings.warn(f"the filesystem of {self.what} does not support locks: a second writer would not be refused", PplWarning, stacklevel=2)
                    return self
                raise PplError(f"cannot lock {self.what}: {e.strerror} ({self.path})", EXIT_OUTPUT) from None
            if same_file(fd, self.path):  # not a lock file that its holder removed meanwhile
                break
            os.close(fd)
        self.fd = fd
        try:
            os.ftruncate(fd, 0)
            os.write(fd, holder_text().encode("utf-8", "replace"))
        except OSError:  # a full disk: the lock holds all the same, only its holder goes unnamed
            pass
        return self

    def release(self) -> None:
        if self.fd is None:
            return
        if self.remove:
            self.path.unlink(missing_ok=True)
        os.close(self.fd)
        self.fd = None

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def holder_text() -> str:
    """pid, host and command line, a served model's URL without its credentials or query."""
    command = " ".join([os.path.basename(sys.argv[0]) or "python", *(public_url(a) for a in sys.argv[1:])])[:300]
    return f"pid {os.getpid()} on {socket.gethostname()}: {command}\n"


def read_holder(fd: int) -> str:
    try:
        text = os.pread(fd, 1000, 0).decode("utf-8", "replace").strip()
    except OSError:
        text = ""
    return text or "a process that has not named itself yet"


def same_file(fd: int, path: Path) -> bool:
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False
