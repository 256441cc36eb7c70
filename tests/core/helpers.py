"""Make scheduler-side requests without an engine."""
from braid.core.request import Request
from braid.engine.messages import EngineCoreRequest
from braid.sampling_params import SamplingParams


def make_request(req_id: str, prompt: list[int], block_size: int = 4, **params) -> Request:
    params.setdefault("max_tokens", 8)
    return Request(EngineCoreRequest(req_id, prompt, SamplingParams(**params)), block_size)
