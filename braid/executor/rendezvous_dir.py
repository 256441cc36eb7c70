"""The private directory where the multiprocess executor's ranks meet: torch.distributed's
file store and the broadcast ring (on the RAM disk when there is one).

The engine holds an exclusive lock on a file in it for as long as it runs. When an engine
and its rank 0 are both killed (a process group killed at once), nobody removes the
directory, and each such crash would leave an 8 MiB ring in /dev/shm: the next engine to
start removes the directories whose lock nobody holds. A lock, not a pid, because engines
in other pid namespaces (containers sharing /dev/shm) may use the same RAM disk."""
from __future__ import annotations

import fcntl
import os
import shutil
import tempfile

PREFIX = "braid-dist-"
_LOCK_FILE = "owner.lock"


class RendezvousDir:
    def __init__(self, base: str | None = None) -> None:
        base = base or ("/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir())
        remove_abandoned(base)
        self.path = tempfile.mkdtemp(prefix=PREFIX, dir=base)
        os.chmod(self.path, 0o700)
        # Locked before it takes its name: a cleaner never sees the lock file unheld.
        staging = os.path.join(self.path, _LOCK_FILE + ".new")
        self._lock_fd = os.open(staging, os.O_CREAT | os.O_RDWR, 0o600)
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        os.rename(staging, os.path.join(self.path, _LOCK_FILE))

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1


def remove_abandoned(base: str) -> None:
    for name in os.listdir(base):
        if not name.startswith(PREFIX):
            continue
        path = os.path.join(base, name)
        try:
            fd = os.open(os.path.join(path, _LOCK_FILE), os.O_RDWR)
        except OSError:
            continue  # another user's, or one still being made: not ours to judge
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # its engine is alive
        finally:
            os.close(fd)
        shutil.rmtree(path, ignore_errors=True)
