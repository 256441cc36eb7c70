"""The auto policy's pure parts: which sizes are measured, the dummy prefill's shape, and
the decision the table gives (the engine-level checks are in tests/distributed/test_dbo.py)."""
from braid.worker.dbo_auto import DboTable, calibrate, calibration_sizes, prefill_shape


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
    # Warm-up + 3 timed runs per (size, way); a 16-token prefill is prompts of 10 and 6.
    assert calls.count((4, 4, False)) == 4 and calls.count((4, 4, True)) == 4 and calls.count((16, 2, True)) == 4
