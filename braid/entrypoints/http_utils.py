"""HTTP plumbing of the server: the API-key and body-size guard, and cancelling the
engine requests of clients that disconnect (streamed or not)."""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from braid.entrypoints.openai_serving import APIError, bad_request

logger = logging.getLogger(__name__)


# How long a rejected request's remaining body is read before the connection is closed anyway.
DRAIN_TIMEOUT_S = 5.0


def error_response(error: APIError, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


# ---- guards: API key and body size, before any route reads the body -------------------------


class GuardMiddleware:
    """Pure ASGI middleware (streams pass through untouched): checks the bearer token on
    /v1 routes, then caps the body (Content-Length first, then counting what arrives)
    and hands the buffered body to the app."""

    def __init__(self, app, api_key: str | None, max_body_bytes: int) -> None:
        self.app = app
        self.api_key = api_key.encode() if api_key else None
        self.max_body_bytes = max_body_bytes

    async def _drain(self, receive, headers: dict[bytes, bytes]) -> None:
        """Read and drop the rest of a rejected body: closing a socket that still holds
        unread data resets the connection, and the client may never see the error.
        Bounded in bytes and time, so a huge or stalled upload is cut off anyway; and
        skipped for 'Expect: 100-continue', whose client has not sent the body yet
        (reading would invite it to)."""
        if headers.get(b"expect", b"").lower() == b"100-continue":
            return

        async def drop() -> None:
            left = max(16 << 20, 2 * self.max_body_bytes)
            while left > 0:
                message = await receive()
                if message["type"] != "http.request" or not message.get("more_body", False):
                    return
                left -= len(message.get("body", b""))

        try:
            await asyncio.wait_for(drop(), DRAIN_TIMEOUT_S)
        except asyncio.TimeoutError:
            pass

    async def _reject(self, send, error: APIError, headers: dict[str, str] | None = None) -> None:
        body = json.dumps(error.body()).encode()
        raw_headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                       (b"connection", b"close")]
        raw_headers += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
        await send({"type": "http.response.start", "status": error.status, "headers": raw_headers})
        await send({"type": "http.response.body", "body": body})

    def _authorized(self, headers: dict[bytes, bytes]) -> bool:
        value = headers.get(b"authorization", b"")
        scheme, _, token = value.partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.api_key)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        path = scope["path"]
        if self.api_key is not None and (path == "/v1" or path.startswith("/v1/")) and scope["method"] != "OPTIONS":
            if not self._authorized(headers):
                error = APIError(401, "Incorrect or missing API key: send it as 'Authorization: Bearer <key>'.",
                                 code="invalid_api_key")
                await self._drain(receive, headers)
                return await self._reject(send, error, {"www-authenticate": "Bearer"})
        too_large = APIError(413, f"The request body exceeds the server's limit of {self.max_body_bytes} bytes "
                                  f"(--max-request-body-bytes).", code="request_too_large")
        length = headers.get(b"content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                return await self._reject(send, bad_request("invalid Content-Length header"))
            if declared > self.max_body_bytes:
                await self._drain(receive, headers)
                return await self._reject(send, too_large)
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        chunks, total = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            total += len(chunk)
            if total > self.max_body_bytes:
                if message.get("more_body", False):
                    await self._drain(receive, headers)
                return await self._reject(send, too_large)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # then: http.disconnect when the client goes

        await self.app(scope, replay, send)


# ---- client disconnects abort their requests ---------------------------------------------


async def _wait_disconnect(receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


class CancellableStreamingResponse(StreamingResponse):
    """Streams SSE while listening for the client: when it goes, the body generator is
    closed, which cancels the engine requests inside it (freeing their KV blocks)."""

    async def __call__(self, scope, receive, send) -> None:
        stream = asyncio.ensure_future(self.stream_response(send))
        listener = asyncio.ensure_future(_wait_disconnect(receive))
        try:
            await asyncio.wait({stream, listener}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (stream, listener):
                task.cancel()
            await asyncio.gather(stream, listener, return_exceptions=True)
            await self.body_iterator.aclose()
        if stream.done() and not stream.cancelled() and stream.exception() is not None:
            if not isinstance(stream.exception(), OSError):
                logger.error("stream failed", exc_info=stream.exception())


async def with_cancellation(request: Request, work) -> Any:
    """Run `work` (a coroutine) unless the client disconnects first; then cancel it (vLLM's
    with_cancellation): cancelling a non-streamed request aborts it in the engine."""
    task = asyncio.ensure_future(work)
    listener = asyncio.ensure_future(_wait_disconnect(request.receive))
    try:
        await asyncio.wait({task, listener}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        listener.cancel()
        if not task.done():
            task.cancel()
        await asyncio.gather(task, listener, return_exceptions=True)
    if task.cancelled():
        return None
    return task.result()
