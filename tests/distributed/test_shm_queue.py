"""The shared-memory broadcast ring: every reader gets every message, in order, through
wrap-around (a writer far ahead of its readers waits for a free slot), overflow frames
over the fallback pipe, and readers that fall asleep and must be woken; a dead reader
never hangs the writer."""
import hashlib
import multiprocessing as mp
import os
import random
import time

import pytest

from braid.executor.shm_queue import BroadcastReader, BroadcastWriter

SLOTS, SLOT_BYTES = 4, 256


def _messages(n: int) -> list[bytes]:
    rng = random.Random(0)
    # Mostly small, some exactly at the slot limit, some overflowing it.
    sizes = [rng.choice([0, 1, 7, 100, SLOT_BYTES - 4, SLOT_BYTES - 3, 1000, 5000]) for _ in range(n)]
    return [bytes(rng.getrandbits(8) for _ in range(size)) for size in sizes]


def _reader_main(path, reader, num_readers, conn, spin_s, count):
    calls = BroadcastReader(path, reader, num_readers, recv_fallback=conn.recv_bytes, spin_s=spin_s,
                            num_slots=SLOTS, slot_bytes=SLOT_BYTES)
    digest = hashlib.sha256()
    for i in range(count):
        message = calls.dequeue()
        digest.update(len(message).to_bytes(4, "little") + message)
        if reader == 0 and i % 50 == 0:
            time.sleep(0.02)  # fall behind: the writer must wait for this slot
    conn.send_bytes(digest.hexdigest().encode())
    calls.close()


@pytest.mark.parametrize("spin_s", [0.0, 0.002], ids=["sleep-at-once", "spin-then-sleep"])
def test_every_reader_gets_every_message_in_order(tmp_path, spin_s):
    messages = _messages(300)
    want = hashlib.sha256()
    for m in messages:
        want.update(len(m).to_bytes(4, "little") + m)
    path = str(tmp_path / "ring")
    ctx = mp.get_context("spawn")
    conns, procs = [], []
    deadline = time.monotonic() + 20

    def check_readers():  # called while the writer waits for a slot: never wait forever
        if time.monotonic() > deadline:
            raise TimeoutError("the readers stopped reading")

    writer = BroadcastWriter(path, 3, send_fallback=lambda r, f: conns[r].send_bytes(f),
                             check_readers=check_readers, num_slots=SLOTS, slot_bytes=SLOT_BYTES)
    for reader in range(3):
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_reader_main, args=(path, reader, 3, child, spin_s, len(messages)), daemon=True)
        proc.start()
        conns.append(parent)
        procs.append(proc)
    for m in messages:
        writer.enqueue(m)
    for conn, proc in zip(conns, procs):
        assert conn.poll(20), "a reader never finished"
        assert conn.recv_bytes().decode() == want.hexdigest()
        proc.join(10)
        assert proc.exitcode == 0
    writer.close()


def test_writer_raises_when_a_reader_is_dead(tmp_path):
    ctx = mp.get_context("spawn")
    dead = ctx.Process(target=os._exit, args=(0,))
    dead.start()
    dead.join()

    def check_readers():
        if not dead.is_alive():
            raise RuntimeError("reader 0 is dead")

    writer = BroadcastWriter(str(tmp_path / "ring"), 1, send_fallback=lambda r, f: None,
                             check_readers=check_readers, num_slots=SLOTS, slot_bytes=SLOT_BYTES)
    for _ in range(SLOTS):
        writer.enqueue(b"x")  # fills the ring; nobody reads
    with pytest.raises(RuntimeError, match="reader 0 is dead"):
        writer.enqueue(b"x")
    writer.close()


def test_a_new_rendezvous_dir_removes_those_whose_engine_is_gone(tmp_path):
    """An engine killed with its rank 0 leaves its ring behind; the next engine's start
    removes it, and leaves alone a live engine's directory (even one whose pid means nothing
    here: another pid namespace) and one that holds no lock file."""
    import subprocess
    import sys

    from braid.executor.rendezvous_dir import RendezvousDir

    live = RendezvousDir(str(tmp_path))
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys; from braid.executor.rendezvous_dir import RendezvousDir; "
        f"d = RendezvousDir({str(tmp_path)!r}); print(d.path, flush=True); sys.stdin.read()")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    held_elsewhere = holder.stdout.readline().strip()
    dead = subprocess.run([sys.executable, "-c", (
        "from braid.executor.rendezvous_dir import RendezvousDir; "
        f"print(RendezvousDir({str(tmp_path)!r}).path)")], capture_output=True, text=True, check=True).stdout.strip()
    (tmp_path / "braid-dist-unowned").mkdir()
    try:
        new = RendezvousDir(str(tmp_path))
        assert sorted(str(p) for p in tmp_path.iterdir()) == sorted(
            [live.path, held_elsewhere, new.path, str(tmp_path / "braid-dist-unowned")])
        assert not os.path.exists(dead)
        new.remove()
        live.remove()
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
            [os.path.basename(held_elsewhere), "braid-dist-unowned"])
    finally:
        holder.stdin.close()
        holder.wait()
