"""One writer, N readers: the engine core broadcasts each step to every worker through a
ring of fixed-size slots in one shared-memory file, so a broadcast is one copy and no
system call, whatever the number of ranks.

Layout of the file (all counters little-endian uint64, 64 bytes apart):

    [written] [sleeping_0 .. sleeping_{N-1}] [read_0 .. read_{N-1}] [slot 0] .. [slot S-1]

Message k goes to slot k % S as [uint32 length][bytes]. The writer publishes it by
bumping `written` to k + 1; reader r takes it when `read_r` < `written`, then bumps
`read_r`. The writer reuses a slot only once every reader has read it.

A message larger than a slot leaves a marker in its slot and travels over reader r's
fallback channel (a pipe) instead, in the same order. A reader that found nothing for
a while (its spin budget) sets `sleeping_r` and blocks on its channel; the writer sends
it a one-byte wake-up after publishing. Both sides put a full fence between their store
and their load (the classic Dekker pattern), so at least one of them sees the other:
no lost wake-ups. A reader blocked on its channel also hears its writer die (EOF).
"""
from __future__ import annotations

import mmap
import os
import struct
import threading
import time
from collections import deque
from typing import Callable

_WORD = 64            # one counter per cache line: no false sharing between readers
_LEN = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_OVERFLOW = 0xFFFFFFFF
WAKE = b"\x00"        # the wake-up frame on a fallback channel; every payload frame is longer
_fence_lock = threading.Lock()


def _fence() -> None:
    """A full memory barrier: taking a lock is one (a locked instruction on x86, dmb on Arm)."""
    with _fence_lock:
        pass


class _Ring:
    def __init__(self, path: str, num_readers: int, num_slots: int, slot_bytes: int, create: bool) -> None:
        self.num_readers, self.num_slots, self.slot_bytes = num_readers, num_slots, slot_bytes
        self._header = _WORD * (1 + 2 * num_readers)
        size = self._header + num_slots * slot_bytes
        flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
        fd = os.open(path, flags, 0o600)
        try:
            if create:
                os.ftruncate(fd, size)
            self.buf = mmap.mmap(fd, size)
        finally:
            os.close(fd)

    def get(self, offset: int) -> int:
        return _U64.unpack_from(self.buf, offset)[0]

    def put(self, offset: int, value: int) -> None:
        _U64.pack_into(self.buf, offset, value)

    written = 0

    def sleeping(self, reader: int) -> int:
        return _WORD * (1 + reader)

    def read(self, reader: int) -> int:
        return _WORD * (1 + self.num_readers + reader)

    def slot(self, seq: int) -> int:
        return self._header + (seq % self.num_slots) * self.slot_bytes

    def close(self) -> None:
        self.buf.close()


class BroadcastWriter:
    """The engine core's end. `send_fallback(reader, frame)` sends a frame over that
    reader's channel; `check_readers()` raises if a reader is gone (called while waiting
    for a slot, so a dead worker never hangs the writer)."""

    def __init__(self, path: str, num_readers: int, send_fallback: Callable[[int, bytes], None],
                 check_readers: Callable[[], None], num_slots: int = 8, slot_bytes: int = 1 << 20) -> None:
        self._ring = _Ring(path, num_readers, num_slots, slot_bytes, create=True)
        self._send_fallback = send_fallback
        self._check_readers = check_readers
        self._seq = 0

    def enqueue(self, message: bytes) -> None:
        ring, seq = self._ring, self._seq
        self._wait_for_free_slot(seq)
        offset = ring.slot(seq)
        overflow = len(message) + _LEN.size > ring.slot_bytes
        if overflow:
            _LEN.pack_into(ring.buf, offset, _OVERFLOW)
            for reader in range(ring.num_readers):
                self._send_fallback(reader, message)
        else:
            _LEN.pack_into(ring.buf, offset, len(message))
            ring.buf[offset + _LEN.size: offset + _LEN.size + len(message)] = message
        _fence()                      # the slot is complete before it is published
        ring.put(ring.written, seq + 1)
        self._seq = seq + 1
        _fence()                      # publish, then look for sleepers (see the module doc)
        for reader in range(ring.num_readers):
            if ring.get(ring.sleeping(reader)):
                self._send_fallback(reader, WAKE)

    def _wait_for_free_slot(self, seq: int) -> None:
        ring = self._ring
        oldest_needed = seq - ring.num_slots   # the message slot `seq` held before
        spins = 0
        while any(ring.get(ring.read(r)) <= oldest_needed for r in range(ring.num_readers)):
            spins += 1
            if spins % 1000 == 0:
                self._check_readers()
                time.sleep(0.0001)
            else:
                os.sched_yield()
        _fence()

    def close(self) -> None:
        self._ring.close()


class BroadcastReader:
    """A worker's end. `recv_fallback()` blocks for the next frame on this reader's
    channel (raising EOFError when the writer is gone). Spins for `spin_s` before it
    sleeps on the channel: long on GPU hosts (a core per rank to spare, the wake-up
    latency matters), short on CPU where the ranks need every core."""

    def __init__(self, path: str, reader: int, num_readers: int, recv_fallback: Callable[[], bytes],
                 spin_s: float, num_slots: int = 8, slot_bytes: int = 1 << 20) -> None:
        self._ring = _Ring(path, num_readers, num_slots, slot_bytes, create=False)
        self._reader = reader
        self._recv_fallback = recv_fallback
        self._spin_s = spin_s
        self._payloads: deque[bytes] = deque()   # overflow frames that came while we slept
        self._seq = 0

    def dequeue(self) -> bytes:
        ring, seq = self._ring, self._seq
        if ring.get(ring.written) <= seq:
            self._wait(seq)
        _fence()                      # see the slot as the writer left it
        offset = ring.slot(seq)
        (length,) = _LEN.unpack_from(ring.buf, offset)
        if length == _OVERFLOW:
            message = self._payloads.popleft() if self._payloads else self._next_payload()
        else:
            message = bytes(ring.buf[offset + _LEN.size: offset + _LEN.size + length])
        _fence()                      # done with the slot before the writer may reuse it
        ring.put(ring.read(self._reader), seq + 1)
        self._seq = seq + 1
        return message

    def _wait(self, seq: int) -> None:
        ring = self._ring
        deadline = time.perf_counter() + self._spin_s
        while time.perf_counter() < deadline:
            if ring.get(ring.written) > seq:
                return
            os.sched_yield()
        sleeping = ring.sleeping(self._reader)
        while True:
            ring.put(sleeping, 1)
            _fence()
            if ring.get(ring.written) > seq:
                ring.put(sleeping, 0)
                return
            frame = self._recv_fallback()    # a wake-up or an overflow payload
            ring.put(sleeping, 0)
            if frame != WAKE:
                self._payloads.append(frame)
            if ring.get(ring.written) > seq:
                return

    def _next_payload(self) -> bytes:
        while True:
            frame = self._recv_fallback()
            if frame != WAKE:
                return frame

    def close(self) -> None:
        self._ring.close()
