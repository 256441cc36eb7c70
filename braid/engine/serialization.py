"""Messages between the frontend and the engine-core process: a type frame and a
msgpack body encoded by msgspec. Nothing is ever pickled on a socket."""
from __future__ import annotations

from dataclasses import dataclass

import msgspec

from braid.engine.messages import EngineCoreOutputs, EngineCoreRequest


@dataclass
class ReadyInfo:
    num_blocks: int
    block_size: int
    max_model_len: int


@dataclass
class UtilityCall:
    call_id: int
    method: str  # a name in EngineCoreProc.UTILITY_METHODS


@dataclass
class UtilityResult:
    call_id: int
    result: bool | int | float | str | None = None
    error: str | None = None


# Frontend -> core.
ADD, ABORT, UTILITY, SHUTDOWN = b"add", b"abort", b"utility", b"shutdown"
# Core -> frontend.
OUTPUTS, READY, ERROR, UTILITY_RESULT = b"outputs", b"ready", b"error", b"utility_result"

_TYPES = {
    ADD: EngineCoreRequest,
    ABORT: list[str],
    UTILITY: UtilityCall,
    SHUTDOWN: None,
    OUTPUTS: EngineCoreOutputs,
    READY: ReadyInfo,
    ERROR: str,
    UTILITY_RESULT: UtilityResult,
}
_encoder = msgspec.msgpack.Encoder()
_decoders = {kind: msgspec.msgpack.Decoder(t) for kind, t in _TYPES.items()}


def encode(kind: bytes, body=None) -> list[bytes]:
    if kind not in _TYPES:
        raise ValueError(f"unknown message type {kind!r}")
    return [kind, _encoder.encode(body)]


def decode(frames: list[bytes]):
    """-> (kind, body); a malformed message raises ValueError."""
    if len(frames) != 2 or frames[0] not in _decoders:
        raise ValueError("malformed engine message")
    try:
        return frames[0], _decoders[frames[0]].decode(frames[1])
    except msgspec.DecodeError as e:
        raise ValueError(f"malformed engine message body: {e}") from e
