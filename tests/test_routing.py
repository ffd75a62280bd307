"""Routing against hostile clients, over real HTTP on every store: no spelling of a path escapes
metering (the gateway decides on the decoded, normalised path and forwards exactly that), a body
metered under a budget is read as the upstream reads it, a gateway-held provider key reaches only
inference endpoints, and a cents or token budget refuses what it cannot meter unless it has a
per-call price.

Paths are sent with `http.client`, which puts the request target on the wire as given (httpx and
the SDKs would normalise some spellings before the gateway saw them).
"""

from __future__ import annotations

import http.client
import threading
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import anthropic
import openai
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from quotagate.config import CallPrice, ConfigError, Upstream, load_file
from quotagate.fake_upstream import FakeUpstream

from .conftest import CHAT, CLAUDE, POLICY, FakeClock, Gateway, cli
from .test_spend import ledger, usage_headers

TOKENS = "100000000;w=3600;u=token"
CENTS = "100000;w=3600;u=cents"
GATEWAY_OPENAI_KEY = "sk-gateway-owned-openai"
GATEWAY_ANTHROPIC_KEY = "sk-ant-gateway-owned"


def send(
    gateway: Gateway, method: str, target: str, headers: dict[str, str], body: bytes | dict[str, Any] | None = None
) -> tuple[int, dict[str, str], bytes]:
    """One request with its target sent byte for byte; status, headers and the whole body."""
    port = int(gateway.url.rsplit(":", 1)[1])
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    data = orjson.dumps(body) if isinstance(body, dict) else body
    try:
        connection.putrequest(method, target, skip_accept_encoding=True)
        for name, value in {**headers, "Content-Length": str(len(data or b""))}.items():
            connection.putheader(name, value)
        connection.endheaders(data)
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        connection.close()


def error(body: bytes) -> dict[str, Any]:
    return dict(orjson.loads(body)["error"])


def auth(key: str, **extra: str) -> dict[str, str]:
    return {"Helicone-Auth": f"Bearer {key}", "Content-Type": "application/json", **extra}


CHAT_STREAM = {"model": "gpt-4o-mini", "messages": CHAT, "stream": True, "max_tokens": 2}


# --- item 2: a path is decided on and forwarded in one normalised form ------------------------------


def test_an_escaped_path_is_metered_as_the_endpoint_it_names(gw: Gateway, upstream: FakeUpstream) -> None:
    """The upstream decodes `%69`: the gateway must too, ask the stream for its usage, and charge it."""
    key = gw.key()
    headers = auth(key, **{POLICY: TOKENS}, **usage_headers(6000, 2))
    status, _, raw = send(gw, "POST", "/v1/chat/complet%69ons", headers, CHAT_STREAM)
    assert status == 200 and raw.endswith(b"data: [DONE]\n\n") and b'"usage"' not in raw
    [received] = upstream.received
    assert received.target == "/v1/chat/completions"
    assert received.json()["stream_options"] == {"include_usage": True}
    assert ledger(gw, key) == {"token": (6002, 0)}  # the usage the upstream reported, not an estimate


METERED: dict[str, tuple[dict[str, Any], int]] = {
    "/v1/chat/completions": ({"model": "gpt-4o-mini", "messages": CHAT, "max_tokens": 2}, 6002),
    "/v1/completions": ({"model": "gpt-3.5-turbo-instruct", "prompt": "Once", "max_tokens": 2}, 6002),
    "/v1/responses": ({"model": "gpt-4o-mini", "input": "Hi", "max_output_tokens": 2}, 6002),
    "/v1/embeddings": ({"model": "text-embedding-3-small", "input": "Hi"}, 6000),
    "/anthropic/v1/messages": ({"model": "claude-haiku-4-5", "messages": CLAUDE, "max_tokens": 2}, 6002),
}


@st.composite
def spellings(draw: st.DrawFn, path: str) -> str:
    """A spelling of `path` an upstream reads as the same endpoint: any character percent-escaped
    (either case of hex), slashes repeated, a trailing slash."""

    def char(c: str) -> str:
        return draw(st.sampled_from([c, f"%{ord(c):02x}", f"%{ord(c):02X}"]))

    segments = ["".join(char(c) for c in segment) for segment in path.strip("/").split("/")]
    slashes = [draw(st.sampled_from(["/", "//", "///"])) for _ in segments]
    trailing = draw(st.sampled_from(["", "/", "//"]))
    return "".join(s + seg for s, seg in zip(slashes, segments, strict=True)) + trailing


_keys: dict[str, str] = {}  # a key per gateway, for every example of a property


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), path=st.sampled_from(sorted(METERED)), stream=st.booleans(), query=st.booleans())
def test_every_spelling_of_a_metered_path_is_forwarded_as_decided_and_charged_in_full(
    gw: Gateway, upstream: FakeUpstream, data: st.DataObject, path: str, stream: bool, query: bool
) -> None:
    target = data.draw(spellings(path)) + ("?x=%2F&y" if query else "")
    body, usage = METERED[path]
    body = {**body, "stream": stream} if not path.endswith("embeddings") else body
    if gw.url not in _keys:
        _keys[gw.url] = gw.key()
    key = _keys[gw.url]
    before = ledger(gw, key).get("token", (0, 0))[0]
    upstream.reset()
    headers = auth(key, **{POLICY: TOKENS})
    status, _, raw = send(gw, "POST", target, {**headers, **usage_headers(6000, 2)}, body)
    assert status == 200, (target, raw[:300])
    [received] = upstream.received
    forwarded = path.removeprefix("/anthropic")
    assert received.target == forwarded + ("?x=%2F&y" if query else "")  # what was decided on
    assert received.json().get("stream_options", {}).get("include_usage") in (None, True)
    if stream and path in ("/v1/chat/completions", "/v1/completions"):
        assert received.json()["stream_options"] == {"include_usage": True}
    charged = sum(used for used, _ in ledger(gw, key).values()) - before
    assert charged == usage  # the full usage the upstream reported


PIECES = ["v1", "chat", "completions", "embeddings", "models", "files", "anthropic", "messages", "/", "//"]
PIECES += ["%2F", "%2f", "%5C", "\\", "%00", "%0a", "%ff", "%zz", "%", ".", "..", "%2e", "%2E%2e", ";", "..;"]
PIECES += ["%69", "%63", "%20", "+", "~", ":", "@", "a", "%C3%A9", "?", "#", "&"]
_metered_suffixes = ("/chat/completions", "/completions", "/embeddings", "/responses", "/messages")


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(middle=st.lists(st.sampled_from(PIECES), max_size=8))
def test_whatever_reaches_the_upstream_under_a_token_budget_is_charged_what_it_reports(
    gw: Gateway, upstream: FakeUpstream, middle: list[str]
) -> None:
    """Any path: refused before the upstream (400, 403, 404), or forwarded in canonical form and
    charged exactly the usage the upstream reports for what it read the path as."""
    target = "/v1/" + "".join(middle)
    if gw.url not in _keys:
        _keys[gw.url] = gw.key()
    key = _keys[gw.url]
    before = ledger(gw, key).get("token", (0, 0))[0]
    upstream.reset()
    headers = auth(key, **{POLICY: TOKENS}, **usage_headers(6000, 2))
    status, _, raw = send(gw, "POST", target, headers, CHAT_STREAM)
    charged = ledger(gw, key).get("token", (0, 0))[0] - before
    if status in (400, 403, 404) and b'"code"' in raw and not upstream.received:
        assert charged == 0
        return
    [received] = upstream.received
    path = received.target.partition("?")[0]
    assert "//" not in path and (path == "/" or not path.endswith("/")), target
    reported = 0 if not received.path.endswith(_metered_suffixes) else 6002  # what the upstream bills
    reported -= 2 if received.path.endswith("/embeddings") else 0  # no output
    assert charged == reported, (target, received.target, status)


NOT_NORMALISABLE = [
    ("/v1/chat%2Fcompletions", 400),  # an encoded '/' would change the segments for some upstreams
    ("/v1/chat%2fcompletions", 400),
    ("/v1/chat%5Ccompletions", 400),  # a backslash: a separator for some servers
    ("/v1/chat\\completions", 400),
    ("/v1/chat/completions%00", 400),  # control characters
    ("/v1/chat/completions%0A", 400),
    ("/v1/chat/complet%ffions", 400),  # not UTF-8
    ("/v1/chat/complet%zzions", 400),  # not an escape
    ("/v1/chat/completions%", 400),
    ("/v1/models/..;/files", 404),  # a '..' with a path parameter: a dot segment for Tomcat and kin
]


@pytest.mark.parametrize(("target", "status"), NOT_NORMALISABLE)
def test_a_path_that_cannot_be_normalised_safely_is_refused(
    gw: Gateway, upstream: FakeUpstream, target: str, status: int
) -> None:
    key = gw.key(policies=["1000;w=60"])
    got, _, raw = send(gw, "POST", target, auth(key, **{POLICY: TOKENS}), CHAT_STREAM)
    assert got == status
    assert error(raw)["code"] == ("invalid_path" if status == 400 else "unknown_route")
    assert upstream.count() == 0
    assert ledger(gw, key) == {}  # nothing counted


@pytest.mark.parametrize(
    ("target", "forwarded"),
    [
        ("//v1//models/", "/v1/models"),
        ("/v1/models/?limit=2&after=x%20y+z&b=%2F", "/v1/models?limit=2&after=x%20y+z&b=%2F"),
        ("/v1/models/ft%3Agpt-4o-mini%3Aacme", "/v1/models/ft:gpt-4o-mini:acme"),
        ("/v1/models/a%20b%C3%A9%7e", "/v1/models/a%20b%C3%A9~"),
        ("/anthropic//v1///models//", "/v1/models"),
    ],
)
def test_what_is_forwarded_is_the_normalised_path(
    gw: Gateway, upstream: FakeUpstream, target: str, forwarded: str
) -> None:
    status, _, _ = send(gw, "GET", target, auth(gw.key()))
    assert status == 200
    assert [r.target for r in upstream.received] == [forwarded]


# --- item 2: a body metered under a budget is read as the upstream reads it --------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("stream", 1),
        ("stream", "true"),
        ("stream", "false"),
        ("stream", [True]),
        ("stream_options", "include_usage"),
        ("stream_options", {"include_usage": "false"}),  # a lenient upstream reads False: no usage chunk
        ("stream_options", {"include_usage": 1}),
        ("n", "5"),  # a lenient upstream generates five completions
        ("max_tokens", "100000"),
        ("max_tokens", 1.5),
    ],
)
def test_a_field_the_upstream_could_read_otherwise_is_a_400(
    gw: Gateway, upstream: FakeUpstream, field: str, value: Any
) -> None:
    key = gw.key()
    body = {**CHAT_STREAM, field: value}
    status, _, raw = send(gw, "POST", "/v1/chat/completions", auth(key, **{POLICY: TOKENS}), body)
    assert status == 400
    problem = error(raw)
    param = f"{field}.include_usage" if isinstance(value, dict) else field
    assert problem["code"] == "invalid_body" and problem["param"] == param and param in problem["message"]
    assert upstream.count() == 0 and ledger(gw, key) == {}
    send(gw, "POST", "/v1/chat/completions", auth(key, **{POLICY: "10;w=60"}), body)
    assert upstream.count() == 1  # no cents or token budget: forwarded, the upstream decides


@pytest.mark.parametrize(
    "body",
    [b"{not json", b"[1, 2]", b'"a string"', b"", b'{"model": "gpt-4o", "x": NaN}', b'\xef\xbb\xbf{"model": "gpt-4o"}'],
    ids=["garbage", "array", "string", "empty", "nan", "bom"],
)
@pytest.mark.parametrize("policy", [TOKENS, CENTS])
def test_a_body_that_cannot_be_metered_is_refused_under_a_cents_or_token_budget(
    gw: Gateway, upstream: FakeUpstream, body: bytes, policy: str
) -> None:
    key = gw.key()
    status, _, raw = send(gw, "POST", "/v1/chat/completions", auth(key, **{POLICY: policy}), body)
    assert status == 400 and error(raw)["code"] == "invalid_body"
    assert upstream.count() == 0 and ledger(gw, key) == {}
    send(gw, "POST", "/v1/chat/completions", auth(key, **{POLICY: "10;w=60"}), body)
    assert [r.body for r in upstream.received] == [body]  # no such budget: forwarded as it is


def test_duplicate_keys_reach_the_upstream_as_the_gateway_read_them(gw: Gateway, upstream: FakeUpstream) -> None:
    """Parsers differ on duplicate keys (most keep the last, some the first): the upstream gets one."""
    key = gw.key()
    headers = auth(key, **{POLICY: TOKENS}, **usage_headers(6000, 2))
    messages = orjson.dumps(CHAT).decode()
    first_true = f'{{"model": "gpt-4o-mini", "stream": true, "messages": {messages}, "stream": false}}'
    status, _, raw = send(gw, "POST", "/v1/chat/completions", headers, first_true.encode())
    assert status == 200 and orjson.loads(raw)["object"] == "chat.completion"
    first_false = f'{{"model": "gpt-4o-mini", "stream": false, "messages": {messages}, "stream": true}}'
    status, _, raw = send(gw, "POST", "/v1/chat/completions", headers, first_false.encode())
    assert status == 200 and raw.endswith(b"data: [DONE]\n\n")
    bodies = [r.body for r in upstream.received]
    assert [b.count(b'"stream"') for b in bodies] == [1, 1]
    assert [orjson.loads(b)["stream"] for b in bodies] == [False, True]
    assert ledger(gw, key) == {"token": (2 * 6002, 0)}


def test_a_body_nested_too_deeply_to_forward_as_read_is_a_400(gw: Gateway, upstream: FakeUpstream) -> None:
    key = gw.key()
    body = b'{"model": "gpt-4o-mini", "messages": ' + b"[" * 300 + b'"x"' + b"]" * 300 + b"}"
    status, _, raw = send(gw, "POST", "/v1/chat/completions", auth(key, **{POLICY: TOKENS}), body)
    assert status == 400 and error(raw)["code"] == "invalid_body"
    assert upstream.count() == 0 and ledger(gw, key) == {}


# --- item 3: a gateway-held provider key reaches only inference endpoints ---------------------------


@pytest.fixture
def keyed(make_gateway: Callable[..., Gateway], store_url: str, clock: FakeClock) -> Gateway:
    """A gateway holding provider keys of its own, on every store."""
    return make_gateway(
        store_url=store_url, clock=clock, openai_api_key=GATEWAY_OPENAI_KEY, anthropic_api_key=GATEWAY_ANTHROPIC_KEY
    )


NOT_INFERENCE = [
    ("GET", "/v1/files"),
    ("DELETE", "/v1/files/file-abc123"),
    ("POST", "/v1/batches"),
    ("POST", "/v1/fine_tuning/jobs"),
    ("GET", "/v1/organization/admin_api_keys"),
    ("DELETE", "/v1/models/ft:gpt-4o-mini:acme::abc123"),  # deletes a fine-tuned model
    ("GET", "/v1/chat/completions"),  # lists stored completions
    ("GET", "/v1/responses/resp_abc"),  # reads a stored response
    ("POST", "/v1/images/generations"),
    ("GET", "/v1/fil%65s"),
    ("GET", "//v1/files/"),
    ("POST", "/anthropic/v1/messages/batches"),
    ("GET", "/anthropic/v1/files"),
]


def test_the_gateway_s_provider_key_reaches_only_inference_endpoints(keyed: Gateway, upstream: FakeUpstream) -> None:
    key = keyed.key(policies=["1000;w=60"])
    for method, target in NOT_INFERENCE:
        status, _, raw = send(keyed, method, target, auth(key), {} if method == "POST" else None)
        assert status == 403, (method, target)
        problem = error(raw)
        assert problem["code"] == "endpoint_not_allowed" and problem["type"] == "permission_error"
        assert "api_key_endpoints" in problem["message"] and problem["endpoint"].startswith(method)
    assert upstream.count() == 0
    assert ledger(keyed, key) == {}  # refused before admission: nothing counted
    # a client that hides its credentials from the upstream (Connection lists them) sends none
    hidden = auth(key, Authorization="Bearer sk-mine", Connection="Authorization")
    assert send(keyed, "GET", "/v1/files", hidden)[0] == 403
    assert upstream.count() == 0
    # a client that sends its own provider credentials reaches any endpoint, with them
    assert send(keyed, "GET", "/v1/files", auth(key, Authorization="Bearer sk-mine"))[0] == 200
    assert send(keyed, "DELETE", "/v1/files/file-abc", auth(key, **{"api-key": "azure-mine"}))[0] == 200
    assert send(keyed, "GET", "/anthropic/v1/files", auth(key, **{"x-api-key": "sk-ant-mine"}))[0] == 200
    mine = [
        (r.headers.get("Authorization"), r.headers.get("api-key"), r.headers.get("x-api-key"))
        for r in upstream.received
    ]
    assert mine == [("Bearer sk-mine", None, None), (None, "azure-mine", None), (None, None, "sk-ant-mine")]


def test_inference_endpoints_work_with_the_gateway_s_key(keyed: Gateway, upstream: FakeUpstream) -> None:
    """The official SDKs, sending no provider key of their own (the header explicitly omitted)."""
    key = keyed.key()
    client = openai.OpenAI(
        base_url=f"{keyed.url}/v1", api_key="unused", max_retries=0, default_headers={"Helicone-Auth": f"Bearer {key}"}
    )
    mine: Any = {"extra_headers": {"Authorization": openai.omit}}
    client.chat.completions.create(model="gpt-4o-mini", messages=CHAT, max_tokens=2, **mine)
    client.completions.create(model="gpt-3.5-turbo-instruct", prompt="Once", max_tokens=2, **mine)
    client.embeddings.create(model="text-embedding-3-small", input="Hi", **mine)
    client.responses.create(model="gpt-4o-mini", input="Hi", max_output_tokens=2, **mine)
    client.responses.input_tokens.count(model="gpt-4o-mini", input="Hi", **mine)
    client.models.list(**mine)
    client.models.retrieve("gpt-4o-mini", **mine)
    with pytest.raises(openai.PermissionDeniedError) as denied:
        client.files.list(**mine)
    assert denied.value.code == "endpoint_not_allowed"
    claude = anthropic.Anthropic(
        base_url=f"{keyed.url}/anthropic",
        api_key="unused",
        max_retries=0,
        default_headers={"Helicone-Auth": f"Bearer {key}"},
    )
    theirs: Any = {"extra_headers": {"x-api-key": anthropic.omit, "Authorization": anthropic.omit}}
    claude.messages.create(model="claude-haiku-4-5", max_tokens=2, messages=CLAUDE, **theirs)
    claude.messages.count_tokens(model="claude-haiku-4-5", messages=CLAUDE, **theirs)
    claude.models.list(**theirs)
    with pytest.raises(anthropic.PermissionDeniedError):
        claude.messages.batches.list(**theirs)
    assert upstream.count() == 10
    openai_calls, claude_calls = upstream.received[:7], upstream.received[7:]
    assert {r.headers.get("Authorization") for r in openai_calls} == {f"Bearer {GATEWAY_OPENAI_KEY}"}
    assert {r.headers.get("x-api-key") for r in claude_calls} == {GATEWAY_ANTHROPIC_KEY}


def test_the_key_scope_is_configurable_per_upstream(
    make_gateway: Callable[..., Gateway], store_url: str, clock: FakeClock, upstream: FakeUpstream
) -> None:
    groq = Upstream("groq", f"{upstream.url}/openai", "openai", "sk-groq", ("POST /groq/v1/chat/completions",))
    gw = make_gateway(
        store_url=store_url,
        clock=clock,
        openai_api_key=GATEWAY_OPENAI_KEY,
        openai_api_key_endpoints=["POST /v1/images/generations", "get /v1/models/**"],
        anthropic_api_key=GATEWAY_ANTHROPIC_KEY,
        anthropic_api_key_endpoints=[],  # nothing
        upstreams={"groq": groq},
    )
    key = gw.key()
    assert send(gw, "POST", "/v1/images/generations", auth(key), {"prompt": "a cat"})[0] == 200
    assert send(gw, "GET", "/v1/models", auth(key))[0] == 200
    assert send(gw, "GET", "/v1/models/gpt-4o", auth(key))[0] == 200
    assert send(gw, "POST", "/v1/chat/completions", auth(key), CHAT_STREAM)[0] == 403  # not in the list
    assert send(gw, "POST", "/groq/v1/chat/completions", auth(key), {**CHAT_STREAM, "stream": False})[0] == 200
    status, _, raw = send(gw, "GET", "/groq/v1/models", auth(key))
    assert status == 403 and "api_key_endpoints of [upstreams.groq]" in error(raw)["message"]
    status, _, raw = send(gw, "POST", "/anthropic/v1/messages", auth(key), {"model": "claude-haiku-4-5"})
    assert status == 403 and "anthropic_api_key_endpoints" in error(raw)["message"]
    assert [r.path for r in upstream.received] == [
        "/v1/images/generations",
        "/v1/models",
        "/v1/models/gpt-4o",
        "/openai/v1/chat/completions",
    ]
    assert upstream.received[-1].headers["Authorization"] == "Bearer sk-groq"


# --- item 4: a cents or token budget refuses what it cannot meter -----------------------------------


@pytest.mark.parametrize("bound", [False, True], ids=["header", "key-bound"])
@pytest.mark.parametrize("policy", [CENTS, TOKENS], ids=["cents", "token"])
def test_an_endpoint_without_usage_is_refused_under_a_cents_or_token_budget(
    gw: Gateway, upstream: FakeUpstream, policy: str, bound: bool
) -> None:
    key = gw.key(policies=[policy] if bound else [])
    client = gw.openai(key, **({} if bound else {POLICY: policy}))
    with pytest.raises(openai.PermissionDeniedError) as refused:
        client.images.generate(model="dall-e-3", prompt="a cat")
    assert refused.value.code == "unmetered_endpoint"
    assert "POST /v1/images/generations" in refused.value.message and "call_prices" in refused.value.message
    for method, target in [("GET", "/v1/files"), ("POST", "/v1/batches"), ("POST", "/v1/audio/speech")]:
        status, _, raw = send(gw, method, target, auth(key, **({} if bound else {POLICY: policy})), {})
        assert status == 403 and error(raw)["code"] == "unmetered_endpoint"
    assert upstream.count() == 0 and ledger(gw, key) == {}
    # what costs nothing is served and charged nothing
    assert client.models.list().data and client.responses.input_tokens.count(model="gpt-4o-mini", input="Hi")
    assert upstream.count() == 2
    assert set(ledger(gw, key).values()) == {(0, 0)}
    # a request budget counts calls, whatever they cost: not refused
    other = gw.key("requests-only")
    assert gw.openai(other, **{POLICY: "10;w=60"}).images.generate(model="dall-e-3", prompt="a cat").data
    assert upstream.count("/images/generations") == 1 and ledger(gw, other) == {"request": (1, 0)}


@pytest.fixture
def priced(make_gateway: Callable[..., Gateway], store_url: str, clock: FakeClock) -> Gateway:
    prices = {
        "POST /v1/images/generations": CallPrice(Decimal("4.5"), 2000),
        "GET /v1/files": CallPrice(Decimal(0), 0),
        "* /v1/files/*": CallPrice(tokens=0),  # cents not priced: still refused under a cents budget
    }
    return make_gateway(store_url=store_url, clock=clock, call_prices=prices)


def test_a_per_call_price_is_held_then_charged_when_the_upstream_succeeds(
    priced: Gateway, upstream: FakeUpstream
) -> None:
    key = priced.key()
    client = priced.openai(key, **{POLICY: f"{CENTS}, {TOKENS}", "X-Fake-Hold": "image"})
    thread = threading.Thread(target=lambda: client.images.generate(model="dall-e-3", prompt="a cat"))
    thread.start()
    try:
        while upstream.count() == 0:
            thread.join(0.01)
        assert ledger(priced, key) == {"cents": (0, 4_500_000), "token": (0, 2000)}  # held in flight
    finally:
        upstream.release("image")
        thread.join(10)
    assert ledger(priced, key) == {"cents": (4_500_000, 0), "token": (2000, 0)}
    failing = priced.openai(key, **{POLICY: f"{CENTS}, {TOKENS}", "X-Fake-Status": "500"})
    with pytest.raises(openai.InternalServerError):
        failing.images.generate(model="dall-e-3", prompt="a cat")
    assert ledger(priced, key) == {"cents": (4_500_000, 0), "token": (2000, 0)}  # a failure costs nothing
    assert client.files.list() is not None
    assert send(priced, "DELETE", "/v1/files/file-1", auth(key, **{POLICY: TOKENS}))[0] == 200
    status, _, raw = send(priced, "DELETE", "/v1/files/file-1", auth(key, **{POLICY: CENTS}))
    assert status == 403 and error(raw)["code"] == "unmetered_endpoint"
    assert upstream.count() == 4


def test_a_per_call_price_bounds_a_budget(priced: Gateway, upstream: FakeUpstream) -> None:
    key = priced.key()
    client = priced.openai(key, **{POLICY: "10;w=3600;u=cents"})
    for _ in range(3):  # 0, 4.5, 9 cents charged before each: below the quota, admitted
        client.images.generate(model="dall-e-3", prompt="a cat")
    with pytest.raises(openai.RateLimitError):
        client.images.generate(model="dall-e-3", prompt="a cat")
    assert upstream.count() == 3 and ledger(priced, key) == {"cents": (13_500_000, 0)}


# --- the settings are validated at load ------------------------------------------------------------


def test_endpoint_settings_from_a_config_file(tmp_path: Path) -> None:
    config = tmp_path / "quotagate.toml"
    config.write_text(
        'openai_api_key_endpoints = ["POST /v1/chat/completions", "GET /v1/files/**"]\n'
        "anthropic_api_key_endpoints = []\n"
        "[upstreams.groq]\n"
        'base_url = "https://api.groq.com/openai"\n'
        'api_key_endpoints = ["POST /groq/v1/chat/completions"]\n'
        "[call_prices]\n"
        '"POST /v1/images/generations" = 4\n'
        '"POST /groq/v1/audio/speech" = { cents = 0.5, tokens = 100 }\n'
    )
    values = load_file(config)
    assert values["openai_api_key_endpoints"] == ("POST /v1/chat/completions", "GET /v1/files/**")
    assert values["anthropic_api_key_endpoints"] == ()
    assert values["upstreams"]["groq"].api_key_endpoints == ("POST /groq/v1/chat/completions",)
    assert values["call_prices"] == {
        "POST /v1/images/generations": CallPrice(Decimal(4)),
        "POST /groq/v1/audio/speech": CallPrice(Decimal("0.5"), 100),
    }


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ('openai_api_key_endpoints = "POST /v1/x"', "openai_api_key_endpoints: must be a list"),
        ('openai_api_key_endpoints = ["/v1/files"]', "openai_api_key_endpoints: entry '/v1/files': expected"),
        ('openai_api_key_endpoints = ["GET v1/files"]', "entry 'GET v1/files'"),
        ('openai_api_key_endpoints = ["GET /v1/../files"]', "no '.', '..'"),
        ('openai_api_key_endpoints = ["GET /v1/**/x"]', "'**' may only be the last"),
        ('openai_api_key_endpoints = ["GET /anthropic/v1/files"]', "not a path under /v1/"),
        ('anthropic_api_key_endpoints = ["GET /v1/files"]', "anthropic_api_key_endpoints: 'GET /v1/files'"),
        (
            '[upstreams.groq]\nbase_url = "http://x"\napi_key_endpoints = ["GET /v1/models"]',
            "upstream 'groq': api_key_endpoints: 'GET /v1/models' is not a path under /groq/",
        ),
        ('[call_prices]\n"POST /nowhere/v1/x" = 1', "call_prices: 'POST /nowhere/v1/x' is not under a route"),
        ('[call_prices]\n"POST /v1/chat/completions" = 1', "is metered from the usage"),
        ('[call_prices]\n"POST /v1/images/generations" = -1', "cents must be a number from 0"),
        ('[call_prices]\n"POST /v1/images/generations" = nan', "cents must be a number from 0"),
        ('[call_prices]\n"POST /v1/images/generations" = { tokens = 1.5 }', "tokens must be a whole number"),
        ('[call_prices]\n"POST /v1/images/generations" = { dollars = 1 }', "takes cents and/or tokens"),
        ('[call_prices]\n"images" = 1', "call_prices: entry 'images'"),
    ],
)
def test_endpoint_settings_are_validated_at_load(tmp_path: Path, toml: str, message: str) -> None:
    config = tmp_path / "bad.toml"
    config.write_text(toml + "\n")
    with pytest.raises(ConfigError) as raised:
        load_file(config)
    assert str(config) in str(raised.value) and message in str(raised.value)


def test_serve_refuses_a_bad_endpoint_setting(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text('[call_prices]\n"POST /v1/images/generations" = "free"\n')
    result = cli("serve", "--config", str(config), check=False)
    assert result.returncode != 0 and str(config) in result.stderr and "call_prices" in result.stderr


def test_serve_applies_the_endpoint_settings_of_its_config_file(
    serve: Callable[..., Gateway], upstream: FakeUpstream, tmp_path: Path
) -> None:
    config = tmp_path / "quotagate.toml"
    config.write_text(
        f'openai_api_key = "{GATEWAY_OPENAI_KEY}"\n'
        'openai_api_key_endpoints = ["GET /v1/files", "POST /v1/images/generations"]\n'
        "[call_prices]\n"
        '"POST /v1/images/generations" = 2.5\n'
    )
    gateway = serve("--workers", "1", "--config", str(config))
    key = gateway.key()
    assert send(gateway, "GET", "/v1/files", auth(key))[0] == 200
    assert send(gateway, "POST", "/v1/chat/completions", auth(key), CHAT_STREAM)[0] == 403
    headers = auth(key, **{POLICY: "10;w=60;u=cents"})
    status, response, _ = send(gateway, "POST", "/v1/images/generations", headers, {"prompt": "a cat"})
    assert status == 200 and response["helicone-ratelimit-remaining"] == "7"  # 10 - 2.5, rounded down
    assert send(gateway, "GET", "/v1/files", headers)[0] == 403  # unpriced under a cents budget
    assert [r.path for r in upstream.received] == ["/v1/files", "/v1/images/generations"]
    assert upstream.received[0].headers["Authorization"] == f"Bearer {GATEWAY_OPENAI_KEY}"
