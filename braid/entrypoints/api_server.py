"""`braid serve`: the OpenAI-compatible HTTP server (FastAPI + uvicorn).

    app = build_app(engine, args)   # routes over an AsyncLLM
    run_server(args)                # start the engine core, serve until SIGINT/SIGTERM, stop the core
"""

import argparse
import asyncio
import logging
import os
import sys

from braid.errors import EngineDeadError

logger = logging.getLogger(__name__)

DEFAULT_MAX_REQUEST_BODY_BYTES = 1 << 20
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"





def _port(text: str) -> int:
    port = int(text)
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"must be in [0, 65535], got {port}")
    return port


def load_chat_template(value: str | None) -> str | None:
    """--chat-template: a file's contents, or the value itself when it is a template."""
    if value is None:
        return None
    from braid.entrypoints.chat_utils import compile_chat_template

    if os.path.isfile(value):
        with open(value, encoding="utf-8") as f:
            value = f.read()
    elif "{" not in value:  # neither a file nor a Jinja template: most likely a mistyped path
        raise ValueError(f"--chat-template: no such file, and not a Jinja template: {value!r}")
    compile_chat_template(value)  # before the engine starts
    return value


def served_model_names(args) -> list[str]:
    names = getattr(args, "served_model_name", None)
    if names:
        return list(names)
    model = getattr(args, "model", None)
    return [model] if model else [DEFAULT_MODEL_NAME]


def build_app(engine, args):
    """The FastAPI app over a started AsyncLLM. Shutting the app down shuts the engine down.
    (The server stack is imported here, so that the CLI stays light for generate and chat.)"""
    from collections.abc import AsyncIterator
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
    from starlette.exceptions import HTTPException as StarletteHTTPException

    import braid
    from braid.entrypoints.http_utils import (
        CancellableStreamingResponse,
        GuardMiddleware,
        error_response,
        with_cancellation,
    )
    from braid.entrypoints.openai_serving import APIError, api_error_for, bad_request, parse_json
    from braid.entrypoints.protocol import (
        ChatCompletionRequest,
        CompletionRequest,
        DetokenizeRequest,
        DetokenizeResponse,
        ModelCard,
        ModelList,
        TokenizeRequest,
        TokenizeResponse,
    )
    from braid.entrypoints.chat_utils import check_chat_template
    from braid.entrypoints.serving_chat import OpenAIServingChat
    from braid.entrypoints.serving_completion import OpenAIServingCompletion

    names = served_model_names(args)
    defaults = engine.config.model.sampling_defaults()
    chat_template = load_chat_template(getattr(args, "chat_template", None))
    if chat_template is not None:
        check_chat_template(engine.tokenizer, chat_template)
    completions = OpenAIServingCompletion(engine, names, defaults)
    chats = OpenAIServingChat(engine, names, defaults, chat_template)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        try:
            yield
        finally:
            engine.shutdown()

    app = FastAPI(title="braid", version=braid.__version__, lifespan=lifespan)
    app.state.engine = engine

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return error_response(e)

    @app.exception_handler(EngineDeadError)
    async def _engine_dead(request: Request, e: EngineDeadError):
        return error_response(api_error_for(e))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, e: RequestValidationError):
        return error_response(bad_request(f"invalid request: {e.errors()[:4]}"))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return error_response(APIError(e.status_code, str(e.detail), type=kind), getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception):
        logger.error("unhandled error on %s", request.url.path)  # api_error_for logs the traceback
        return error_response(api_error_for(e))

    async def _respond(request: Request, serving, model_cls):
        body = parse_json(model_cls, await request.body())
        result = await with_cancellation(request, serving.create(body))
        if result is None:  # the client went away; its request was aborted
            return Response(status_code=499)
        if isinstance(result, AsyncIterator):
            return CancellableStreamingResponse(result, media_type="text/event-stream",
                                                headers={"Cache-Control": "no-cache"})
        return JSONResponse(result.model_dump())

    @app.post("/v1/completions")
    async def create_completion(request: Request):
        return await _respond(request, completions, CompletionRequest)

    @app.post("/v1/chat/completions")
    async def create_chat_completion(request: Request):
        return await _respond(request, chats, ChatCompletionRequest)

    @app.get("/v1/models")
    async def list_models():
        root = engine.config.model.model
        return ModelList(data=[ModelCard(id=name, root=root, max_model_len=engine.max_model_len) for name in names])

    @app.get("/health")
    async def health():
        if engine.is_dead:
            return error_response(api_error_for(EngineDeadError(engine.dead_reason or "the engine core is gone")))
        return Response(status_code=200)

    @app.get("/version")
    async def version():
        return {"version": braid.__version__}

    @app.post("/tokenize")
    async def tokenize(request: Request):
        body = parse_json(TokenizeRequest, await request.body())
        completions.check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise bad_request("give exactly one of prompt or messages", "prompt")
        if body.messages is not None:
            _, tokens = chats.render(body.messages, body.add_generation_prompt,
                                     continue_final_message=body.continue_final_message)
        else:
            tokens = engine.tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens)
        return TokenizeResponse(count=len(tokens), max_model_len=engine.max_model_len, tokens=tokens)

    @app.post("/detokenize")
    async def detokenize(request: Request):
        body = parse_json(DetokenizeRequest, await request.body())
        completions.check_model(body.model)
        vocab = engine.input_processor.vocab_size
        if any(not 0 <= t < vocab for t in body.tokens):
            raise bad_request(f"tokens must be in [0, {vocab})", "tokens")
        return DetokenizeResponse(prompt=engine.tokenizer.decode(body.tokens))

    @app.get("/metrics")
    async def metrics():
        registry = engine.metrics.registry if engine.metrics is not None else None
        data = generate_latest(registry) if registry is not None else b""
        return Response(data, media_type=CONTENT_TYPE_LATEST)

    max_body = getattr(args, "max_request_body_bytes", None) or DEFAULT_MAX_REQUEST_BODY_BYTES
    app.add_middleware(GuardMiddleware, api_key=_api_key(args), max_body_bytes=max_body)
    return app


def _api_key(args) -> str | None:
    return getattr(args, "api_key", None) or os.environ.get("BRAID_API_KEY") or None


# ---- running it -------------------------------------------------------------------------------


def _uvicorn_server(config):
    """uvicorn's Server, but a SIGINT/SIGTERM ends serve() cleanly (exit code 0) instead of
    being re-raised once the graceful shutdown is done."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            super().handle_exit(sig, frame)
            captured = getattr(self, "_captured_signals", None)
            if isinstance(captured, list):
                captured.clear()

    return Server(config)


def _bind(host: str, port: int):
    """Bind the listening socket before the (slow) engine start, so a taken port fails at once."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(2048)  # listening claims the port (a bound socket alone does not, with SO_REUSEADDR)
    except OSError as e:
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port} (--host/--port): {e.strerror or e}") from None
    sock.set_inheritable(False)
    return sock


async def _serve(args) -> None:
    import uvicorn

    from braid.engine.arg_utils import EngineArgs
    from braid.engine.async_llm import AsyncLLM
    from braid.gc_heap import freeze_startup_heap
    from braid.observe.metrics import EngineMetrics

    names = served_model_names(args)
    load_chat_template(args.chat_template)  # a bad --chat-template fails before the engine starts
    sock = _bind(args.host, args.port)
    try:
        engine = AsyncLLM.from_engine_args(EngineArgs.from_cli_args(args), metrics=EngineMetrics(names[0]))
        try:
            app = build_app(engine, args)
            freeze_startup_heap()  # the tokenizer and the app: no full collection walks them mid-stream
            config = uvicorn.Config(app, log_level=args.uvicorn_log_level, timeout_graceful_shutdown=5,
                                    lifespan="on")
            server = _uvicorn_server(config)
            print(f"braid serve: {', '.join(names)} on http://{args.host}:{args.port}", file=sys.stderr, flush=True)
            await server.serve(sockets=[sock])
        finally:
            engine.shutdown()  # again, in case the app never started: no engine core outlives the server
    finally:
        sock.close()


def _event_loop_factory():
    """uvloop's event loop where installed (the serve extra installs it; vLLM serves on it too):
    each SSE chunk and each request costs the loop less. Otherwise asyncio's."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def run_server(args: argparse.Namespace) -> int:
    try:
        with asyncio.Runner(loop_factory=_event_loop_factory()) as runner:
            runner.run(_serve(args))
    except KeyboardInterrupt:
        pass
    return 0


def add_server_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    from braid.engine.arg_utils import EngineArgs

    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    parser.add_argument("--port", type=_port, default=8000)
    parser.add_argument("--served-model-name", nargs="+", default=None,
                        help="name(s) the model answers to (default: the model path, or "
                             f"{DEFAULT_MODEL_NAME} for the default model)")
    parser.add_argument("--api-key", default=None,
                        help="require 'Authorization: Bearer <key>' on /v1 routes (or set BRAID_API_KEY)")
    parser.add_argument("--max-request-body-bytes", type=int, default=DEFAULT_MAX_REQUEST_BODY_BYTES,
                        help="larger request bodies get HTTP 413")
    parser.add_argument("--disable-log-requests", action="store_true",
                        help="accepted for vLLM command lines: braid does not log request contents anyway")
    parser.add_argument("--chat-template", default=None,
                        help="a Jinja chat template, or a file holding one, used instead of the tokenizer's")
    parser.add_argument("--uvicorn-log-level", default="warning",
                        choices=["critical", "error", "warning", "info", "debug", "trace"])
    EngineArgs.add_cli_args(parser, model_positional=True)
    return parser


def add_serve_parser(subparsers) -> argparse.ArgumentParser:
    """Register `braid serve` on the CLI's subparsers; its func returns an exit code."""
    parser = subparsers.add_parser("serve", help="serve the model over an OpenAI-compatible HTTP API")
    add_server_args(parser)
    parser.set_defaults(func=run_server)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = add_server_args(argparse.ArgumentParser(prog="braid serve"))
    parser.add_argument("--log-level", default="WARNING")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    try:
        return run_server(args)
    except ValueError as e:
        print(f"braid serve: error: {e}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
