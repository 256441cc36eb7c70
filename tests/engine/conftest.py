import pytest

from braid.transformers_utils import default_model_path


@pytest.fixture(scope="session")
def smollm2_path() -> str:
    return default_model_path()


def assert_pool_full(llm) -> None:
    kv = llm.llm_engine.kv_cache_manager
    assert kv.num_free_blocks == kv.num_blocks, f"{kv.num_blocks - kv.num_free_blocks} KV blocks leaked"
    assert not llm.llm_engine.has_unfinished_requests()
