"""The private directory where the multiprocess executor's ranks meet: torch.distributed's
file store and the broadcast ring (on the RAM disk when there is one).

The engine writes its pid into it. When an engine and its rank 0 are both killed (a
process group killed at once), nobody removes the directory, and each such crash would
leave an 8 MiB ring in /dev/shm: the next engine to start removes those whose owner is gone."""
from __future__ import annotations

import os
import shutil
import tempfile

PREFIX = "braid-dist-"
_OWNER_FILE = "owner"


def make_rendezvous_dir(base: str | None = None) -> str:
    base = base or ("/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir())
    remove_abandoned(base)
    path = tempfile.mkdtemp(prefix=PREFIX, dir=base)
    os.chmod(path, 0o700)
    with open(os.path.join(path, _OWNER_FILE), "w") as f:
        f.write(str(os.getpid()))
    return path


def remove_abandoned(base: str) -> None:
    for name in os.listdir(base):
        if not name.startswith(PREFIX):
            continue
        path = os.path.join(base, name)
        try:
            with open(os.path.join(path, _OWNER_FILE)) as f:
                owner = int(f.read())
        except (OSError, ValueError):
            continue  # another user's, or one still being made: not ours to judge
        if not _alive(owner):
            shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True
