"""Block tables per request over the block pool, with automatic prefix caching.

Every full block of a request's tokens gets a hash chained from the block
before it, so a hash names the whole prefix up to and including that block.
A new request reuses the longest run of its leading blocks found in the cache.
"""
from __future__ import annotations

import hashlib
from array import array
from dataclasses import dataclass

from braid.core.block_pool import BlockPool, KVBlock
from braid.core.request import Request


def hash_block_tokens(parent_hash: bytes | None, token_ids: list[int]) -> bytes:
    h = hashlib.sha256(parent_hash or b"")
    h.update(array("q", token_ids).tobytes())
    return h.digest()


@dataclass
class PrefixCacheStats:
    queries: int = 0  # tokens looked up
    hits: int = 0  # tokens found

    @property
    def hit_rate(self) -> float:
        return self.hits / self.queries if self.queries else 0.0


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool) -> None:
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.pool = BlockPool(num_blocks, enable_caching)
        self.req_to_blocks: dict[str, list[KVBlock]] = {}
        # Leading blocks of each request already offered to the prefix cache: a decode step
        # offers only its newly full block, not the whole table again.
        self.num_cached_blocks: dict[str, int] = {}
        self.stats = PrefixCacheStats()

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    def usage(self) -> float:
        return self.pool.usage()

    def update_block_hashes(self, request: Request) -> None:
        """Hash every newly full block of the request's known tokens."""
        bs = self.block_size
        hashes = request.block_hashes
        while (len(hashes) + 1) * bs <= request.num_tokens:
            start = len(hashes) * bs
            parent = hashes[-1] if hashes else None
            hashes.append(hash_block_tokens(parent, request.all_token_ids[start : start + bs]))

    def get_computed_blocks(self, request: Request) -> tuple[list[KVBlock], int]:
        """The longest cached prefix of the request, leaving at least one token to compute."""
        if not self.enable_caching or request.sampling_params.prompt_logprobs is not None:
            return [], 0
        self.update_block_hashes(request)
        max_blocks = (request.num_tokens - 1) // self.block_size
        hits: list[KVBlock] = []
        for block_hash in request.block_hashes[:max_blocks]:
            block = self.pool.lookup(block_hash)
            if block is None:
                break
            hits.append(block)
        return hits, len(hits) * self.block_size

    def record_prefix_lookup(self, num_tokens: int, num_hit_tokens: int) -> None:
        """Count one request's lookup (the scheduler calls this once, when it first schedules it)."""
        if self.enable_caching:
            self.stats.queries += num_tokens
            self.stats.hits += num_hit_tokens

    def allocate_slots(
        self,
        request: Request,
        num_new_tokens: int,
        new_computed_blocks: list[KVBlock] | None = None,
        num_lookahead_tokens: int = 0,
    ) -> list[int] | None:
        """Make room for num_new_tokens more tokens (plus lookahead slots).

        Returns the block ids appended to the request's table (cache hits first),
        or None, changing nothing, when the pool cannot supply them.
        """
        new_computed_blocks = new_computed_blocks or []
        blocks = self.req_to_blocks.setdefault(request.request_id, [])
        num_computed = request.num_computed_tokens + len(new_computed_blocks) * self.block_size
        total_tokens = num_computed + num_new_tokens + num_lookahead_tokens
        num_needed = -(-total_tokens // self.block_size) - len(blocks) - len(new_computed_blocks)
        # Hits that sit in the free list stop being allocatable once touched.
        num_evictable_hits = sum(1 for b in new_computed_blocks if b.ref_cnt == 0)
        if max(num_needed, 0) > self.pool.num_free_blocks - num_evictable_hits:
            if not blocks:
                del self.req_to_blocks[request.request_id]
            return None
        self.pool.touch(new_computed_blocks)
        new_blocks = self.pool.allocate(num_needed) if num_needed > 0 else []
        blocks.extend(new_computed_blocks)
        blocks.extend(new_blocks)
        self._cache_full_blocks(request, blocks, num_computed + num_new_tokens)
        return [b.block_id for b in new_computed_blocks + new_blocks]

    def _cache_full_blocks(self, request: Request, blocks: list[KVBlock], num_tokens: int) -> None:
        if not self.enable_caching:
            return
        self.update_block_hashes(request)
        num_full = min(num_tokens // self.block_size, len(request.block_hashes))
        done = self.num_cached_blocks.get(request.request_id, 0)
        for block, block_hash in zip(blocks[done:num_full], request.block_hashes[done:num_full]):
            self.pool.cache_block(block, block_hash)
        if num_full > done:
            self.num_cached_blocks[request.request_id] = num_full

    def free(self, request: Request) -> None:
        blocks = self.req_to_blocks.pop(request.request_id, [])
        # Under async scheduling a block is first fully known one step after its KV was
        # scheduled: offer it now, or a request that finishes then never leaves it in the cache.
        # Only KV that passes which have reported wrote: a pass still to launch (interleaved
        # multi-step) is dropped once the request has finished, and never writes its slot.
        self._cache_full_blocks(request, blocks, request.num_computed_tokens - request.num_output_placeholders)
        self.num_cached_blocks.pop(request.request_id, None)
        self.pool.free(list(reversed(blocks)))

    def block_ids(self, request_id: str) -> list[int]:
        return [b.block_id for b in self.req_to_blocks.get(request_id, [])]

    def reset_prefix_cache(self) -> bool:
        return self.pool.reset_prefix_cache()
