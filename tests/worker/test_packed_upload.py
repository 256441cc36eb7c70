"""The packed host-to-device upload keeps every view 16-byte aligned whatever the batch's sizes."""
import numpy as np

from braid.worker.batch_inputs import PACK_ALIGN, packed_layout


def test_every_view_starts_16_byte_aligned():
    # Sizes that leave an int32 or int64 array off a 16-byte boundary (1, 3, 5 elements).
    arrays = [np.zeros(n, dtype=dt) for n, dt in ((1, np.int64), (3, np.int32), (5, np.int32), (2, np.int64),
                                                  (0, np.int64), (7, np.int32))]
    offsets, total = packed_layout(arrays)
    assert PACK_ALIGN == 16
    assert all(off % 16 == 0 for off in offsets)
    # Views do not overlap and fit in the buffer.
    ends = [off + a.nbytes for off, a in zip(offsets, arrays)]
    assert all(end <= nxt for end, nxt in zip(ends, offsets[1:]))
    assert ends[-1] <= total
