"""Calling through the gateway with the official SDKs: every route, streamed and not, what the
upstream receives, what comes back, and the errors of the proxy itself."""

from __future__ import annotations

import http.client
import threading
from collections.abc import Callable, Iterator

import anthropic
import openai
import orjson
import pytest
from aiohttp import web
from multidict import CIMultiDict

from quotagate.config import Upstream
from quotagate.fake_upstream import BackgroundServer, FakeUpstream

from .conftest import CHAT, CLAUDE, Gateway, free_port, httpx


def test_chat_completion_passes_through(gateway: Gateway, upstream: FakeUpstream) -> None:
    key = gateway.key()
    client = gateway.openai(key, **{"Helicone-User-Id": "alice", "Helicone-Property-Team": "a", "X-Custom": "kept"})
    raw = client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=CHAT, max_tokens=5)
    completion = raw.parse()
    assert raw.http_response.status_code == 200
    assert completion.choices[0].message.content == "word0 word1 word2 word3 word4"
    assert completion.usage is not None and completion.usage.completion_tokens == 5
    assert raw.headers["X-Fake-Upstream"] == "1"  # upstream response headers pass through
    [received] = upstream.received
    assert received.path == "/v1/chat/completions"
    assert received.headers["Authorization"] == "Bearer sk-client-provider-key"  # provider key untouched
    assert received.headers["X-Custom"] == "kept"
    assert not [h for h in received.headers if h.lower().startswith("helicone-")]
    assert received.json()["messages"] == CHAT
    assert "Helicone-RateLimit-Limit" not in raw.headers  # no policy, no rate-limit headers


def test_chat_completion_stream_arrives_chunk_by_chunk(gateway: Gateway, upstream: FakeUpstream) -> None:
    """The fake upstream sends one event, then waits until the test has received it: a gateway
    that buffered the stream would never deliver it, and this test would time out."""
    client = gateway.openai(gateway.key(), **{"X-Fake-Hold": "first-chunk"})
    stream = client.chat.completions.create(model="gpt-4o-mini", messages=CHAT, max_tokens=3, stream=True)
    iterator = iter(stream)
    first = next(iterator)
    assert first.choices[0].delta.role == "assistant"
    upstream.release("first-chunk")
    rest = list(iterator)
    assert "".join(c.choices[0].delta.content or "" for c in rest) == " word0 word1 word2"
    assert all(c.usage is None for c in rest)


def test_stream_usage_when_the_client_asks(gateway: Gateway) -> None:
    client = gateway.openai(gateway.key())
    chunks = list(
        client.chat.completions.create(
            model="gpt-4o-mini", messages=CHAT, max_tokens=2, stream=True, stream_options={"include_usage": True}
        )
    )
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 2


def test_completions_embeddings_models_and_responses(gateway: Gateway, upstream: FakeUpstream) -> None:
    client = gateway.openai(gateway.key())
    assert client.completions.create(model="gpt-3.5-turbo-instruct", prompt="Once", max_tokens=2).choices[0].text
    embedding = client.embeddings.create(model="text-embedding-3-small", input=["a", "b"])
    assert len(embedding.data) == 2 and embedding.usage.prompt_tokens == 2
    assert "gpt-4o" in [m.id for m in client.models.list()]
    response = client.responses.create(model="gpt-4o-mini", input="Hello there", max_output_tokens=3)
    assert response.output_text == "word0 word1 word2"
    events = list(client.responses.create(model="gpt-4o-mini", input="Hi", max_output_tokens=2, stream=True))
    assert events[-1].type == "response.completed"
    assert [r.path for r in upstream.received] == [
        "/v1/completions",
        "/v1/embeddings",
        "/v1/models",
        "/v1/responses",
        "/v1/responses",
    ]


def test_anthropic_messages_streamed_and_not(gateway: Gateway, upstream: FakeUpstream) -> None:
    client = gateway.anthropic(gateway.key())
    message = client.messages.create(model="claude-haiku-4-5", max_tokens=4, messages=CLAUDE)
    assert message.content[0].type == "text" and message.content[0].text == "word0 word1 word2 word3"
    with client.messages.stream(model="claude-haiku-4-5", max_tokens=3, messages=CLAUDE) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == " word0 word1 word2" and final.usage.output_tokens == 3
    assert [r.path for r in upstream.received] == ["/v1/messages", "/v1/messages"]
    assert upstream.received[0].headers["Authorization"] == "Bearer sk-ant-client-key"  # as the SDK sent it


def test_query_string_and_method_pass_through(gateway: Gateway, upstream: FakeUpstream) -> None:
    key = gateway.key()
    with gateway.http() as http:
        response = http.get("/v1/models?limit=2&after=x%20y+z&b=%2F&d=%7E", headers={"Helicone-Auth": f"Bearer {key}"})
    assert response.status_code == 200
    assert upstream.received[0].method == "GET"
    assert upstream.received[0].path == "/v1/models"
    assert upstream.received[0].target == "/v1/models?limit=2&after=x%20y+z&b=%2F&d=%7E"  # byte for byte


@pytest.mark.parametrize("header", [None, "Bearer", "Bearer qg_nope", "Basic abc", "Bearer qg_0123456789ab_wrong"])
def test_missing_or_unknown_key_is_401_and_nothing_reaches_upstream(
    gateway: Gateway, upstream: FakeUpstream, header: str | None
) -> None:
    headers = {"Helicone-Auth": header} if header is not None else {}
    with gateway.http() as http:
        response = http.post("/v1/chat/completions", json={"model": "gpt-4o", "messages": CHAT}, headers=headers)
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_gateway_key"
    assert upstream.count() == 0


def test_wrong_secret_for_a_real_key_id_is_401(gateway: Gateway, upstream: FakeUpstream) -> None:
    key = gateway.key()
    forged = key[: key.rindex("_") + 1] + "x" * 43 if key.count("_") == 2 else key[:-4] + "xxxx"
    with pytest.raises(openai.AuthenticationError):
        gateway.openai(forged).models.list()
    assert upstream.count() == 0


def test_sdk_raises_authentication_error_without_a_key(gateway: Gateway) -> None:
    client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="sk-x", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as info:
        client.models.list()
    assert "Helicone-Auth" in info.value.message


def test_upstream_error_passes_through_unchanged(gateway: Gateway, upstream: FakeUpstream) -> None:
    client = gateway.openai(gateway.key(), **{"X-Fake-Status": "500"})
    with pytest.raises(openai.InternalServerError) as info:
        client.chat.completions.create(model="gpt-4o", messages=CHAT)
    assert info.value.status_code == 500
    assert info.value.body == {"message": "fake upstream error 500", "type": "api_error", "param": None, "code": None}
    assert upstream.count() == 1
    upstream.reset()
    with pytest.raises(openai.RateLimitError):  # the provider's own 429 too
        gateway.openai(gateway.key("b"), **{"X-Fake-Status": "429"}).models.list()


def test_unreachable_upstream_is_502(make_gateway: Callable[..., Gateway]) -> None:
    gateway = make_gateway(openai_base_url=f"http://127.0.0.1:{free_port()}")
    with gateway.http() as http:
        response = http.get("/v1/models", headers={"Helicone-Auth": f"Bearer {gateway.key()}"})
    assert response.status_code == 502
    assert response.json()["error"]["code"] == "upstream_unreachable"


def test_timed_out_upstream_is_504(make_gateway: Callable[..., Gateway], upstream: FakeUpstream) -> None:
    """The provider never answers (held until the test ends): the upstream timeout ends the call."""
    gateway = make_gateway(upstream_timeout=0.3)
    with gateway.http() as http:
        response = http.get("/v1/models", headers={"Helicone-Auth": f"Bearer {gateway.key()}", "X-Fake-Hold": "never"})
    upstream.release("never")
    assert response.status_code == 504
    assert response.json()["error"]["code"] == "upstream_timeout"


def test_body_over_the_limit_is_413(make_gateway: Callable[..., Gateway], upstream: FakeUpstream) -> None:
    gateway = make_gateway(max_body_bytes=1000)
    key = gateway.key()
    with gateway.http() as http:
        big = http.post(
            "/v1/chat/completions",
            headers={"Helicone-Auth": f"Bearer {key}"},
            json={"model": "gpt-4o", "messages": [{"role": "user", "content": "x" * 2000}]},
        )
        small = http.post(
            "/v1/chat/completions",
            headers={"Helicone-Auth": f"Bearer {key}"},
            json={"model": "gpt-4o", "messages": CHAT},
        )
    assert big.status_code == 413 and big.json()["error"]["code"] == "request_too_large"
    assert small.status_code == 200
    assert upstream.count() == 1


def test_unknown_route_is_404(gateway: Gateway, upstream: FakeUpstream) -> None:
    with gateway.http() as http:
        response = http.get("/nowhere/v1/models", headers={"Helicone-Auth": f"Bearer {gateway.key()}"})
    assert response.status_code == 404 and "no route" in response.json()["error"]["message"]
    assert upstream.count() == 0


@pytest.mark.parametrize("path", ["/v1/chat%2Fcompletions", "/v1/chat/complet%zzions", "/nowhere/v1/models"])
@pytest.mark.parametrize("header", [None, "Bearer qg_nope"])
def test_authentication_comes_before_a_refused_path(
    gateway: Gateway, upstream: FakeUpstream, path: str, header: str | None
) -> None:
    headers = {"Helicone-Auth": header} if header is not None else {}
    with gateway.http() as http:
        response = http.post(path, json={"model": "gpt-4o", "messages": CHAT}, headers=headers)
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_gateway_key"
    assert upstream.count() == 0


def test_base_url_with_prefix_and_v1_is_not_doubled(
    make_gateway: Callable[..., Gateway], upstream: FakeUpstream
) -> None:
    gateway = make_gateway(openai_base_url=f"{upstream.url}/openai/v1", anthropic_base_url=f"{upstream.url}/claude/")
    key = gateway.key()
    gateway.openai(key).models.list()
    gateway.anthropic(key).messages.create(model="claude-haiku-4-5", max_tokens=2, messages=CLAUDE)
    assert [r.path for r in upstream.received] == ["/openai/v1/models", "/claude/v1/messages"]


def test_named_upstream_from_config(make_gateway: Callable[..., Gateway], upstream: FakeUpstream) -> None:
    groq = Upstream("groq", f"{upstream.url}/openai", "openai", "sk-groq-configured")
    gateway = make_gateway(upstreams={"groq": groq})
    key = gateway.key()
    with gateway.http() as http:
        response = http.post(
            "/groq/v1/chat/completions",
            headers={"Helicone-Auth": f"Bearer {key}"},
            json={"model": "llama-3.1-8b-instant", "messages": CHAT},
        )
    assert response.status_code == 200
    [received] = upstream.received
    assert received.path == "/openai/v1/chat/completions"
    assert received.headers["Authorization"] == "Bearer sk-groq-configured"  # client sent none


def test_configured_provider_key_only_when_the_client_sends_none(
    make_gateway: Callable[..., Gateway], upstream: FakeUpstream
) -> None:
    gateway = make_gateway(openai_api_key="sk-gateway-owned", anthropic_api_key="sk-ant-gateway")
    key = gateway.key()
    with gateway.http() as http:
        http.get("/v1/models", headers={"Helicone-Auth": f"Bearer {key}"})
        http.get("/v1/models", headers={"Helicone-Auth": f"Bearer {key}", "Authorization": "Bearer sk-mine"})
        http.post(
            "/anthropic/v1/messages",
            headers={"Helicone-Auth": f"Bearer {key}"},
            json={"model": "claude-haiku-4-5", "max_tokens": 1, "messages": CLAUDE},
        )
    assert [r.headers.get("Authorization") for r in upstream.received[:2]] == [
        "Bearer sk-gateway-owned",
        "Bearer sk-mine",
    ]
    assert upstream.received[2].headers["x-api-key"] == "sk-ant-gateway"


def raw_get(gateway: Gateway, path: str, headers: list[tuple[str, str]]) -> tuple[int, CIMultiDict[str]]:
    """A GET with exactly these header lines (repeated names kept; no Accept or Accept-Encoding added)."""
    connection = http.client.HTTPConnection("127.0.0.1", int(gateway.url.rsplit(":", 1)[1]), timeout=30)
    try:
        connection.putrequest("GET", path, skip_host=True, skip_accept_encoding=True)
        for name, value in headers:
            connection.putheader(name, value)
        connection.endheaders()
        response = connection.getresponse()
        response.read()
        return response.status, CIMultiDict(response.getheaders())
    finally:
        connection.close()


def test_request_headers_pass_through_without_additions(gateway: Gateway, upstream: FakeUpstream) -> None:
    """What the client did not send the gateway does not add (Host and the framing aside)."""
    status, _ = raw_get(gateway, "/v1/models", [("Host", "g"), ("Helicone-Auth", f"Bearer {gateway.key()}")])
    assert status == 200
    [received] = upstream.received
    assert "Accept" not in received.headers and "User-Agent" not in received.headers
    assert "Content-Type" not in received.headers


def test_request_headers_named_in_any_connection_line_are_not_forwarded(
    gateway: Gateway, upstream: FakeUpstream
) -> None:
    headers = [
        ("Host", "g"),
        ("Helicone-Auth", f"Bearer {gateway.key()}"),
        ("Connection", "X-Hop-One"),
        ("Connection", "X-Hop-Two"),
        ("X-Hop-One", "1"),
        ("X-Hop-Two", "2"),
        ("X-End-To-End", "kept"),
    ]
    assert raw_get(gateway, "/v1/models", headers)[0] == 200
    [received] = upstream.received
    assert received.headers["X-End-To-End"] == "kept"
    assert "X-Hop-One" not in received.headers and "X-Hop-Two" not in received.headers


@pytest.fixture
def hop_upstream() -> Iterator[str]:
    """An upstream whose answer carries hop-by-hop headers: Connection (two lines) and what it names."""

    async def answer(request: web.Request) -> web.StreamResponse:
        headers = CIMultiDict(
            [
                ("Connection", "X-Hop-One"),
                ("Connection", "X-Hop-Two"),
                ("X-Hop-One", "1"),
                ("X-Hop-Two", "2"),
                ("Keep-Alive", "timeout=5"),
                ("Proxy-Authenticate", "Basic"),
                ("X-End-To-End", "kept"),
            ]
        )
        if "stream" not in request.query:
            return web.json_response({"object": "list", "data": []}, headers=headers)
        response = web.StreamResponse(headers={**headers, "Content-Type": "text/event-stream"})
        response.headers.extend(headers)  # both Connection lines
        await response.prepare(request)
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    server = BackgroundServer(app).start()
    yield server.url
    server.stop()


@pytest.mark.parametrize("stream", [False, True])
def test_hop_by_hop_response_headers_are_not_forwarded(
    make_gateway: Callable[..., Gateway], hop_upstream: str, stream: bool
) -> None:
    gateway = make_gateway(openai_base_url=hop_upstream)
    key = gateway.key()
    headers = [("Host", "g"), ("Helicone-Auth", f"Bearer {key}"), ("Helicone-RateLimit-Policy", "5;w=60")]
    status, answer = raw_get(gateway, "/v1/models" + ("?stream" if stream else ""), headers)
    assert status == 200
    assert answer["X-End-To-End"] == "kept" and answer["Helicone-RateLimit-Remaining"] == "4"
    for name in ("X-Hop-One", "X-Hop-Two", "Keep-Alive", "Proxy-Authenticate"):
        assert name not in answer, name


def test_health_and_readiness(gateway: Gateway) -> None:
    with gateway.http() as http:
        assert http.get("/healthz").json() == {"status": "ok"}
        ready = http.get("/readyz")
    assert ready.status_code == 200 and ready.json()["store"] == "up"


def test_concurrent_streams_do_not_wait_for_each_other(gateway: Gateway, upstream: FakeUpstream) -> None:
    """A held stream does not block another request on the same gateway."""
    client = gateway.openai(gateway.key(), **{"X-Fake-Hold": "slow"})
    first: list[str] = []

    def slow() -> None:
        stream = client.chat.completions.create(model="gpt-4o", messages=CHAT, max_tokens=2, stream=True)
        first.extend(c.choices[0].delta.content or "" for c in stream)

    thread = threading.Thread(target=slow)
    thread.start()
    other = gateway.openai(gateway.key("other")).chat.completions.create(model="gpt-4o", messages=CHAT)
    assert other.choices[0].message.content
    upstream.release("slow")
    thread.join(timeout=10)
    assert "".join(first) == " word0 word1"


def test_non_json_body_is_forwarded_as_is(gateway: Gateway, upstream: FakeUpstream) -> None:
    key = gateway.key()
    with gateway.http() as http:
        response = http.post(
            "/v1/chat/completions",
            content=b"{not json",
            headers={"Helicone-Auth": f"Bearer {key}", "Content-Type": "application/json"},
        )
    assert response.status_code == 400  # the upstream's own answer
    assert upstream.received[0].body == b"{not json"
    assert orjson.loads(response.content)["error"]["type"] == "invalid_request_error"


def test_anthropic_sdk_error_types(gateway: Gateway) -> None:
    client = anthropic.Anthropic(base_url=f"{gateway.url}/anthropic", api_key="x", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError):
        client.messages.create(model="claude-haiku-4-5", max_tokens=1, messages=CLAUDE)


def test_http_client_sees_sse_content_type(gateway: Gateway) -> None:
    key = gateway.key()
    with (
        httpx.Client(base_url=gateway.url) as http,
        http.stream(
            "POST",
            "/v1/chat/completions",
            headers={"Helicone-Auth": f"Bearer {key}"},
            json={"model": "gpt-4o", "messages": CHAT, "stream": True, "max_tokens": 1},
        ) as response,
    ):
        body = response.read()
    assert response.headers["content-type"].startswith("text/event-stream")
    assert body.endswith(b"data: [DONE]\n\n")
