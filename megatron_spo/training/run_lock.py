"""One run per run directory: an exclusive lock held for the life of a run.

`fcntl.flock` on `<run_dir>/.lock`: the kernel releases it when the process ends, however it ends
(a SIGKILL included), so a killed run never leaves a stale lock behind. The file names the holder
(pid, host, start time) for the error a second run gets. POSIX only; elsewhere no lock is taken.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

LOCK_FILE = ".lock"


class RunDirLock:
    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / LOCK_FILE
        self._fh = None

    def acquire(self) -> str | None:
        """Take the lock; None when taken, else who holds it."""
        try:
            import fcntl
        except ImportError:  # not POSIX
            return None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(self.path, "a+")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fh.seek(0)
            holder = fh.read().strip() or "a process that did not say who it is"
            fh.close()
            return holder
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        fh.flush()
        self._fh = fh
        return None

    def release(self) -> None:
        if self._fh is not None:
            self._fh.close()  # closing the descriptor drops the flock
            self._fh = None
