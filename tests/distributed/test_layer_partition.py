"""Which layers each pipeline stage holds: an even split by default, --pp-layer-partition
when given."""
import pytest

from braid.distributed import parallel_state
from braid.distributed.parallel_state import ParallelLayout, pp_layer_range


def test_even_split_gives_the_first_stages_the_extra_layers():
    assert [pp_layer_range(30, r, 4) for r in range(4)] == [(0, 8), (8, 16), (16, 23), (23, 30)]
    assert [pp_layer_range(32, r, 2) for r in range(2)] == [(0, 16), (16, 32)]


def test_partition_override(monkeypatch):
    ranges = []
    for rank in range(3):
        monkeypatch.setattr(parallel_state, "_layout",
                            ParallelLayout(pp_rank=rank, pp_size=3, pp_layer_partition=(5, 20, 7)))
        ranges.append(pp_layer_range(32))
    assert ranges == [(0, 5), (5, 25), (25, 32)]
    with pytest.raises(ValueError, match="must give 3 stages summing to the model's 30 layers"):
        pp_layer_range(30)
