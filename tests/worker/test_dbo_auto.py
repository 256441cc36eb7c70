"""The auto policy's pure parts: which sizes are measured, the dummy prefill's shape, and
the decision the table gives (the engine-level checks are in tests/distributed/test_dbo.py)."""
from braid.worker.dbo_auto import (DboTable, calibrate, calibration_sizes, decode_shape, paired_median_ms,
                                   prefill_shape, spread_blocks)


def test_calibration_sizes():
    assert calibration_sizes(32, 256) == [32, 64, 128, 256]
    assert calibration_sizes(32, 100) == [32, 64, 100]
    assert calibration_sizes(48, 256) == [64, 128, 256]
    assert calibration_sizes(300, 256) == []


def test_prefill_shape_is_whole_prompts_of_at_most_max_len():
    assert prefill_shape(1000, 256) == ([256, 256, 256, 232], [256, 256, 256, 232])
    assert prefill_shape(512, 1024) == ([512], [512])


def test_table_splits_only_where_it_measured_a_gain():
    table = DboTable(decode=[(32, 10.0, 12.0), (128, 20.0, 15.0)], prefill=[(512, 100.0, 99.0), (2048, 300.0, 200.0)])
    assert not table.pays(16, True)        # below every measured size
    assert not table.pays(64, True)        # the 32-token row: split was slower
    assert table.pays(128, True) and table.pays(500, True)
    assert not table.pays(1000, False)     # 1% faster is inside the 2% margin
    assert table.pays(4096, False)


def test_calibrate_times_both_ways_at_every_size():
    calls = []
    table = calibrate(lambda q, s, split: calls.append((sum(q), len(q), split)), lambda: None, [4, 8], [16], 10)
    assert [r[0] for r in table.decode] == [4, 8] and [r[0] for r in table.prefill] == [16]
    # Warm-up + 5 timed runs per (size, way); a 16-token prefill is prompts of 10 and 6.
    assert calls.count((4, 4, False)) == 6 and calls.count((4, 4, True)) == 6 and calls.count((16, 2, True)) == 6


def test_calibrate_uses_the_decode_shape_it_is_given():
    seen = []
    calibrate(lambda q, s, split: seen.append((tuple(q), tuple(s))), lambda: None, [4], [], 10,
              lambda n: decode_shape(n, 512, 300, 10_000))
    assert set(seen) == {((1,) * 4, (300,) * 4)}  # context 512 cut to the 300-token limit


def test_whole_and_split_runs_alternate():
    order = []
    paired_median_ms(lambda: order.append("whole"), lambda: order.append("split"), lambda: None, reps=3)
    assert order == ["whole", "split"] * 4


def test_decode_shape_fits_the_limit_and_the_pool():
    assert decode_shape(4, 512, 1023, 10_000) == ([1] * 4, [512] * 4)
    assert decode_shape(4, 512, 100, 10_000) == ([1] * 4, [100] * 4)
    assert decode_shape(64, 512, 1023, 4096) == ([1] * 64, [64] * 64)   # 4096 pool tokens over 64 requests
    assert decode_shape(8, 512, 1023, 0) == ([1] * 8, [1] * 8)


def test_spread_blocks_are_distinct_until_the_pool_wraps():
    tables = spread_blocks([33, 16, 1], block_size=16, num_blocks=100)
    assert tables == [[0, 1, 2], [3], [4]]
    wrapped = spread_blocks([64, 64], block_size=16, num_blocks=6)
    assert wrapped == [[0, 1, 2, 3], [4, 5, 0, 1]]
