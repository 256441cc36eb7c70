"""Schema-driven fuzzing of the HTTP API from braid's own OpenAPI document.

One `braid serve` (tiny llama checkpoint, CPU) is started; its /openapi.json gives the routes
(and their request-body schemas where the document declares them; the POST routes read the raw
body themselves, so for those the schemas come from the pydantic models in protocol.py that
the routes validate against). For every route, hypothesis generates bodies from the schema and
deliberately malformed variants of them: wrong types, huge / negative numbers, NaN-like values,
unicode, missing and extra fields, empty bodies, invalid JSON, non-object JSON, a missing API key.

Properties, after every case:
- no response is a 5xx;
- every 4xx on a /v1 route (and on /tokenize, /detokenize) has OpenAI's error shape
  {"error": {"message", "type", "param", "code"}};
- the server is still alive (/health is 200).

Generated valid generation requests are kept cheap: max_tokens / max_completion_tokens / n /
best_of / min_tokens are clamped before sending (values beyond the context stay, they are
rejected before any work), so the whole file runs in well under 90 s on 2 CPU cores.
Runs are derandomized (reproducible) and keep no example database.
"""
from __future__ import annotations

import collections
import json
import math

import httpx
import pytest

hypothesis = pytest.importorskip("hypothesis")
hypothesis_jsonschema = pytest.importorskip("hypothesis_jsonschema")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from braid.entrypoints import protocol  # noqa: E402
from tests.entrypoints.server_utils import RemoteServer  # noqa: E402
from tests.tiny_checkpoints import make_tiny_checkpoint  # noqa: E402

KEY = "sk-fuzz-key"
MODEL = "tiny"
MAX_MODEL_LEN = 128
BODY_LIMIT = 64 * 1024
GEN_CAP = 3  # most tokens a generated valid request may ask for

# Bodies of routes that read the raw request (no requestBody in the OpenAPI document).
BODY_MODELS = {
    "/v1/completions": protocol.CompletionRequest,
    "/v1/chat/completions": protocol.ChatCompletionRequest,
    "/tokenize": protocol.TokenizeRequest,
    "/detokenize": protocol.DetokenizeRequest,
}
GENERATION_ROUTES = {"/v1/completions", "/v1/chat/completions"}
ERROR_SHAPE_ROUTES = {"/tokenize", "/detokenize"}  # besides every /v1 route
# Examples per route; POST routes that run the model cost the most.
MAX_EXAMPLES = {
    "/v1/completions": 100,
    "/v1/chat/completions": 100,
    "/tokenize": 80,
    "/detokenize": 80,
}
MAX_EXAMPLES_OTHER = 15

# Routes served by FastAPI itself, not by braid.
SKIP_PATHS = {"/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"}

EXPECTED_ROUTES = {
    ("POST", "/v1/completions"), ("POST", "/v1/chat/completions"), ("GET", "/v1/models"),
    ("GET", "/health"), ("GET", "/version"), ("POST", "/tokenize"), ("POST", "/detokenize"),
    ("GET", "/metrics"),
}


# ---- the server and its OpenAPI document ------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    checkpoint = make_tiny_checkpoint("llama", tmp_path_factory.mktemp("tiny-llama-fuzz"))
    srv = RemoteServer(checkpoint, "--served-model-name", MODEL, "--max-model-len", str(MAX_MODEL_LEN),
                       "--max-request-body-bytes", str(BODY_LIMIT), "--device", "cpu", api_key=KEY)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    # A fresh connection per request: hypothesis can pause for seconds between cases (generating and
    # shrinking), longer than uvicorn's keep-alive, and reusing a connection the server just closed
    # is a client-side reset, not a server fault.
    with httpx.Client(base_url=server.url, timeout=60, limits=httpx.Limits(max_keepalive_connections=0)) as c:
        yield c


@pytest.fixture(scope="module")
def openapi(client):
    r = client.get("/openapi.json")
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["openapi"].startswith("3.") and doc["paths"], doc
    return doc


def _routes(doc: dict) -> list[tuple[str, str]]:
    return sorted((method.upper(), path) for path, ops in doc["paths"].items() if path not in SKIP_PATHS
                  for method in ops if method in {"get", "post", "put", "patch", "delete"})


def _inline_refs(schema, defs: dict, depth: int = 0):
    """Replace every $ref (#/components/schemas/X or #/$defs/X) by its target (our schemas are not recursive)."""
    assert depth < 20, "recursive schema"
    if isinstance(schema, dict):
        if "$ref" in schema:
            target = defs[schema["$ref"].rsplit("/", 1)[-1]]
            return _inline_refs(target, defs, depth + 1)
        return {k: _inline_refs(v, defs, depth) for k, v in schema.items() if k != "$defs"}
    if isinstance(schema, list):
        return [_inline_refs(v, defs, depth) for v in schema]
    return schema


def _body_schema(doc: dict, method: str, path: str) -> dict | None:
    op = doc["paths"][path][method.lower()]
    content = op.get("requestBody", {}).get("content", {}).get("application/json")
    if content is not None:
        return _inline_refs(content["schema"], doc.get("components", {}).get("schemas", {}))
    model = BODY_MODELS.get(path)
    if model is None:
        return None
    schema = model.model_json_schema()
    return _inline_refs(schema, schema.get("$defs", {}))


def test_openapi_lists_every_route(openapi):
    assert set(_routes(openapi)) == EXPECTED_ROUTES, "a route was added or removed: update the fuzzer's tables"


# ---- strategies ---------------------------------------------------------------------------

JUNK_STRINGS = ["", "NaN", "nan", "Infinity", "-Infinity", "inf", "1e999", "-0", "null", "true", "0x10",
                "\u0000", "\ud7ff\ufffd", "😀" * 50, "é\u0301", "\u202e", "<|im_end|>", "<|im_start|>",
                "{{ 7*7 }}", "{% raise %}", "' OR 1=1 --", "a" * 5000]
JUNK_NUMBERS = [0, -1, -(2**31), 2**31, 2**63, -(2**63) - 1, 2**64, 10**30, 1e308, -1e308, 1e-320,
                float("nan"), float("inf"), float("-inf"), 0.5, -0.0]

junk_scalars = st.one_of(
    st.sampled_from(JUNK_STRINGS), st.sampled_from(JUNK_NUMBERS), st.none(), st.booleans(),
    st.text(max_size=40), st.integers(), st.floats(allow_nan=True, allow_infinity=True),
)
junk_values = st.recursive(
    junk_scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=8,
)


def _valid_bodies(schema: dict) -> st.SearchStrategy:
    return hypothesis_jsonschema.from_schema(schema, allow_x00=True, codec="utf-8")


def _model_values() -> st.SearchStrategy:
    return st.sampled_from([MODEL, MODEL, MODEL, None, "", "other-model", "tiny "])


@st.composite
def _variant(draw, schema: dict | None):
    """One request: (json_body | raw_bytes | None, send_key). Mostly schema-valid, often malformed."""
    if schema is None:  # a route without a body: send garbage anyway, it must be ignored or refused
        kind = draw(st.sampled_from(["none", "none", "junk_json", "raw"]))
        if kind == "none":
            return None, True
        if kind == "junk_json":
            return draw(junk_values), True
        return draw(st.binary(max_size=64)), True

    props = list(schema.get("properties", {}))
    required = list(schema.get("required", []))
    kind = draw(st.sampled_from(["valid"] * 6 + ["wrong_field"] * 5 + ["missing", "extra", "empty", "raw",
                                 "not_object", "no_key", "truncated"]))
    send_key = True
    if kind == "empty":
        return b"", True
    if kind == "raw":
        return draw(st.one_of(st.binary(max_size=200), st.text(max_size=200).map(str.encode))), True
    if kind == "not_object":
        return draw(st.one_of(junk_scalars, st.lists(junk_values, max_size=3))), True

    body = draw(_valid_bodies(schema))
    if kind == "valid":
        # Schema-valid optional fields are often out of range together (temperature -3, top_k -9, ...):
        # keep only a few so that accepted requests are common too.
        optional = sorted(k for k in body if k not in required)
        keep = draw(st.sets(st.sampled_from(optional), max_size=2)) if optional else set()
        body = {k: v for k, v in body.items() if k in required or k in keep}
        # Schema-valid prompts are mostly refused (random ids beyond the tiny vocabulary, empty
        # strings): half the time send one that is fine, so accepted requests are common too.
        if "prompt" in required and draw(st.booleans()):
            body["prompt"] = draw(st.sampled_from(["Hello", "", [1, 2, 3], ["a", "b c"], [[5], [6, 7]]]))
    if "model" in props:
        model = draw(_model_values())
        if model is None:
            body.pop("model", None)
        else:
            body["model"] = model
    if kind == "wrong_field" and props:
        for name in draw(st.lists(st.sampled_from(props), min_size=1, max_size=3, unique=True)):
            body[name] = draw(junk_values)
    elif kind == "missing" and body:
        for name in draw(st.lists(st.sampled_from(sorted(set(body) | set(required))), min_size=1, max_size=3,
                                  unique=True)):
            body.pop(name, None)
    elif kind == "extra":
        body.update(draw(st.dictionaries(st.text(min_size=1, max_size=12), junk_values, min_size=1, max_size=4)))
    elif kind == "no_key":
        send_key = False
    elif kind == "truncated":
        raw = json.dumps(body).encode()
        return raw[: draw(st.integers(0, max(0, len(raw) - 1)))], True
    return body, send_key


def _clamp(path: str, body):
    """Keep generation requests cheap: small budgets that would run the model are cut down; values beyond
    the context are left alone (they are rejected before any work)."""
    if path not in GENERATION_ROUTES or not isinstance(body, dict):
        return body
    for name, cap in (("max_tokens", GEN_CAP), ("max_completion_tokens", GEN_CAP), ("min_tokens", GEN_CAP),
                      ("n", 2), ("best_of", 2)):
        v = body.get(name)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and cap < v <= 4 * MAX_MODEL_LEN:
            body[name] = cap
    if path == "/v1/chat/completions":
        if body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
            body["max_tokens"] = GEN_CAP
    elif body.get("max_tokens", 16) is None or "max_tokens" not in body:
        body["max_tokens"] = GEN_CAP
    return body


# ---- sending and checking -------------------------------------------------------------------


def _send(client: httpx.Client, method: str, path: str, body, send_key: bool) -> httpx.Response:
    headers = {"Authorization": f"Bearer {KEY}"} if send_key else {}
    if body is None:
        return client.request(method, path, headers=headers)
    if isinstance(body, bytes):
        content = body
    else:
        content = json.dumps(body, allow_nan=True).encode()  # NaN/Infinity tokens on purpose
    return client.request(method, path, content=content,
                          headers={**headers, "content-type": "application/json"})


SEEN: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)  # path -> status counts


def _check(client: httpx.Client, method: str, path: str, body, send_key: bool) -> None:
    r = _send(client, method, path, body, send_key)
    SEEN[path][r.status_code] += 1
    case = f"{method} {path} body={body!r:.2000} -> {r.status_code} {r.text[:2000]!r}"
    assert r.status_code < 500, f"server error: {case}"
    if 400 <= r.status_code < 500 and (path.startswith("/v1/") or path in ERROR_SHAPE_ROUTES):
        try:
            payload = r.json()
        except ValueError:
            pytest.fail(f"4xx body is not JSON: {case}")
        assert isinstance(payload, dict) and set(payload) == {"error"}, f"not OpenAI's error shape: {case}"
        error = payload["error"]
        assert isinstance(error, dict) and set(error) == {"message", "type", "param", "code"}, \
            f"not OpenAI's error shape: {case}"
        assert isinstance(error["message"], str) and error["message"], f"empty error message: {case}"
        assert isinstance(error["type"], str) and error["type"], f"empty error type: {case}"
    health = client.get("/health")
    assert health.status_code == 200, f"server unhealthy after {case}: {health.status_code} {health.text!r}"


def _fuzz_params():
    # The route list is only known once the server runs; parametrize over the expected routes and let
    # test_openapi_lists_every_route keep that table honest.
    return [pytest.param(m, p, id=f"{m} {p}") for m, p in sorted(EXPECTED_ROUTES)]


@pytest.mark.parametrize("method,path", _fuzz_params())
def test_fuzz_route(client, openapi, method, path):
    assert (method, path) in set(_routes(openapi)), f"{method} {path} is not in /openapi.json"
    schema = _body_schema(openapi, method, path)
    strategy = _variant(schema)

    @settings(max_examples=MAX_EXAMPLES.get(path, MAX_EXAMPLES_OTHER), deadline=None, derandomize=True,
              database=None, print_blob=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                     HealthCheck.filter_too_much, HealthCheck.large_base_example])
    @given(case=strategy)
    def run(case):
        body, send_key = case
        _check(client, method, path, _clamp(path, body), send_key)

    run()


def test_fuzzing_reached_both_sides():
    """The generators are not degenerate: every body route saw accepted requests and refused ones."""
    for path in BODY_MODELS:
        seen = SEEN[path]
        assert seen[200] > 0 and sum(n for s, n in seen.items() if 400 <= s < 500) > 0, (path, dict(seen))
    print({path: dict(sorted(seen.items())) for path, seen in SEEN.items()})
