import pytest

from braid.core.block_pool import BlockPool
from braid.core.kv_cache_manager import KVCacheManager
from tests.core.helpers import make_request


def test_allocate_and_free_returns_pool_to_full():
    kv = KVCacheManager(num_blocks=10, block_size=4, enable_caching=True)
    req = make_request("a", list(range(10)))
    ids = kv.allocate_slots(req, 10)
    assert len(ids) == 3 and len(set(ids)) == 3
    assert kv.num_free_blocks == 7
    kv.free(req)
    assert kv.num_free_blocks == 10


def test_allocation_failure_changes_nothing():
    kv = KVCacheManager(num_blocks=2, block_size=4, enable_caching=True)
    req = make_request("a", list(range(12)))
    assert kv.allocate_slots(req, 12) is None
    assert kv.num_free_blocks == 2
    assert "a" not in kv.req_to_blocks


def test_prefix_hit_reuses_full_blocks_and_leaves_one_token():
    kv = KVCacheManager(num_blocks=16, block_size=4, enable_caching=True)
    a = make_request("a", list(range(12)))
    kv.allocate_slots(a, 12)
    a.num_computed_tokens = 12
    kv.free(a)
    # Same 12 tokens: at most 2 blocks may hit (the last token must be computed).
    b = make_request("b", list(range(12)))
    hits, n = kv.get_computed_blocks(b)
    assert n == 8 and [h.block_id for h in hits] == kv_block_ids_of_first(kv, 2, a)
    # A longer prompt sharing the first 8 tokens hits 2 blocks, then misses.
    c = make_request("c", list(range(8)) + [99] * 8)
    _, n = kv.get_computed_blocks(c)
    assert n == 8


def kv_block_ids_of_first(kv, n, req):
    # a's blocks were freed in reverse order; they still carry their hashes.
    return [kv.pool.lookup(h).block_id for h in req.block_hashes[:n]]


def test_cached_free_blocks_are_evicted_lru_and_hits_are_not_double_counted():
    kv = KVCacheManager(num_blocks=4, block_size=4, enable_caching=True)
    a = make_request("a", list(range(8)))
    kv.allocate_slots(a, 8)
    kv.free(a)
    assert kv.num_free_blocks == 4
    b = make_request("b", list(range(8)) + [7, 7, 7, 7, 7])
    hits, n = kv.get_computed_blocks(b)
    assert n == 8
    # 13 tokens need 4 blocks: 2 hits + 2 new; both hits were free, so only 2 remain allocatable.
    b.num_computed_tokens = 0
    ids = kv.allocate_slots(b, 5, hits)
    assert ids is not None and len(ids) == 4
    assert kv.num_free_blocks == 0
    kv.free(b)
    assert kv.num_free_blocks == 4


def test_shared_blocks_need_every_owner_to_free():
    kv = KVCacheManager(num_blocks=8, block_size=4, enable_caching=True)
    a = make_request("a", list(range(9)))
    kv.allocate_slots(a, 9)
    b = make_request("b", list(range(9)))
    hits, n = kv.get_computed_blocks(b)
    assert n == 8
    kv.allocate_slots(b, 1, hits)
    assert kv.pool.blocks[hits[0].block_id].ref_cnt == 2
    kv.free(a)
    assert kv.pool.blocks[hits[0].block_id].ref_cnt == 1
    kv.free(b)
    assert kv.num_free_blocks == 8


def test_no_prefix_caching_never_hits():
    kv = KVCacheManager(num_blocks=8, block_size=4, enable_caching=False)
    a = make_request("a", list(range(9)))
    kv.allocate_slots(a, 9)
    kv.free(a)
    _, n = kv.get_computed_blocks(make_request("b", list(range(9))))
    assert n == 0


def test_prompt_logprobs_requests_skip_the_cache():
    kv = KVCacheManager(num_blocks=8, block_size=4, enable_caching=True)
    a = make_request("a", list(range(9)))
    kv.allocate_slots(a, 9)
    kv.free(a)
    _, n = kv.get_computed_blocks(make_request("b", list(range(9)), prompt_logprobs=1))
    assert n == 0


def test_lookahead_slots_reserve_extra_blocks():
    kv = KVCacheManager(num_blocks=8, block_size=4, enable_caching=True)
    a = make_request("a", list(range(4)))
    ids = kv.allocate_slots(a, 4, num_lookahead_tokens=5)
    assert len(ids) == 3


def test_block_pool_rejects_double_free():
    pool = BlockPool(2, enable_caching=True)
    (b,) = pool.allocate(1)
    pool.free([b])
    with pytest.raises(AssertionError):
        pool.free([b])


def test_blocks_filled_by_decode_steps_are_cached_one_by_one():
    """Each decode step offers only its newly full block; every block still ends up cached,
    and a request that comes back after being freed starts the count again."""
    kv = KVCacheManager(num_blocks=16, block_size=4, enable_caching=True)
    a = make_request("a", list(range(6)))
    kv.allocate_slots(a, 6)
    a.num_computed_tokens = 6
    for token in range(100, 111):  # 11 decode steps: 17 tokens, 4 full blocks
        a.append_output_token(token)
        kv.allocate_slots(a, 1)
        a.num_computed_tokens += 1
        assert kv.num_cached_blocks["a"] == a.num_computed_tokens // 4
    kv.free(a)
    assert "a" not in kv.num_cached_blocks
    b = make_request("b", list(range(6)) + list(range(100, 111)))
    hits, n = kv.get_computed_blocks(b)
    assert n == 16 and len(hits) == 4  # all four full blocks, the decoded ones included


def test_a_block_computed_twice_stays_findable_after_one_copy_is_evicted():
    """A request that skipped the cache lookup (prompt logprobs) computes its own copy of a
    cached block; that copy serves hits once the first is evicted."""
    kv = KVCacheManager(num_blocks=6, block_size=4, enable_caching=True)
    a = make_request("a", list(range(8)))
    b = make_request("b", list(range(8)), prompt_logprobs=0)
    kv.allocate_slots(a, 8)
    kv.allocate_slots(b, 8)
    kv.free(a)
    c = make_request("c", list(range(100, 116)))
    kv.allocate_slots(c, 16)  # takes the two unused blocks and evicts a's two
    d = make_request("d", list(range(8)) + [5])
    hits, n = kv.get_computed_blocks(d)
    assert n == 8 and [h.block_id for h in hits] == kv.block_ids("b")


def test_a_hit_prefers_the_copy_in_use_over_a_free_one():
    kv = KVCacheManager(num_blocks=6, block_size=4, enable_caching=True)
    a = make_request("a", list(range(8)))
    b = make_request("b", list(range(8)), prompt_logprobs=0)
    kv.allocate_slots(a, 8)
    kv.allocate_slots(b, 8)
    kv.free(a)  # a's copies are free (still cached), b's in use
    hits, _ = kv.get_computed_blocks(make_request("c", list(range(8)) + [5]))
    assert [h.block_id for h in hits] == kv.block_ids("b")
