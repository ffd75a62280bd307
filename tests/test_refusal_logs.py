"""The log line of a request the gateway answers itself (400, 429, ...) names the policy it concerns
and the reason, as `quotagate serve` writes it; what `--on-policy-error ignore` leaves out is logged
too. Never a secret, and a client's text only bounded and inert."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx2 as httpx
import orjson
import pytest

from quotagate.config import ConfigError, Settings, load_file
from quotagate.fake_upstream import FakeUpstream

from .conftest import CHAT, POLICY, Gateway, cli

PROVIDER_KEY = "sk-client-provider-secret-0123456789"
BODY = {"model": "gpt-4o-mini", "messages": CHAT, "max_tokens": 4}


def access_lines(gateway: Gateway) -> list[dict[str, Any]]:
    lines = [orjson.loads(line) for line in gateway.log_lines() if line.startswith("{")]
    return [line for line in lines if line["logger"] == "quotagate.access"]


def send(http: httpx.Client, key: str, policy: str, body: Any = BODY, **headers: str) -> httpx.Response:
    sent = {"Helicone-Auth": f"Bearer {key}", "Authorization": f"Bearer {PROVIDER_KEY}", POLICY: policy, **headers}
    return http.post("/v1/chat/completions", json=body, headers=sent)


def test_400_and_429_lines_name_the_policy_and_the_reason(
    serve: Callable[..., Gateway], upstream: FakeUpstream
) -> None:
    gateway = serve("--workers", "1")
    key = gateway.key()
    long_unit = "x" * 5000
    expensive = {"X-Fake-Prompt-Tokens": "100000"}  # 100,000 input tokens of gpt-4o-mini: 1.5 cents
    with gateway.http() as http:
        statuses = [
            send(http, key, "10;w=5").status_code,
            send(http, key, f"1;w=60;u={long_unit}").status_code,
            send(http, key, "5;w=60;s=org").status_code,
            send(http, key, "5;w=60;u=cents", {**BODY, "stream": 1}).status_code,
            send(http, key, "1;w=60, 100;w=3600;s=user", **{"Helicone-User-Id": "alice"}).status_code,
            send(http, key, "1;w=60, 100;w=3600;s=user", **{"Helicone-User-Id": "alice"}).status_code,
            send(http, key, "1;w=120;u=cents", **expensive).status_code,
            send(http, key, "1;w=120;u=cents", **expensive).status_code,
            send(http, key, "1;w=300, 60;w=300").status_code,
            send(http, key, "1;w=300, 60;w=300").status_code,
            send(http, key, ",".join(["1;w=60"] * 21)).status_code,
        ]
    assert statuses == [400, 400, 400, 400, 200, 429, 200, 429, 200, 429, 400]
    lines = access_lines(gateway)
    assert [line["status"] for line in lines] == statuses
    refused = [line for line in lines if line["status"] >= 400]

    window, unit, segment, body, requests, cents, shared, many = refused
    assert (window["error_code"], window["policy"]) == ("invalid_rate_limit_policy", "10;w=5")
    assert window["reason"] == "window w=5 is outside 60..31536000 seconds"
    assert unit["error_code"] == "invalid_rate_limit_policy" and unit["policy"].startswith("1;w=60;u=xxx")
    assert len(unit["policy"]) < 300 and len(unit["reason"]) < 300 and "(5009 characters)" in unit["policy"]
    assert (segment["error_code"], segment["policy"]) == ("missing_segment_value", "5;w=60;s=org")
    assert "Helicone-Property-org" in segment["reason"]
    assert (body["error_code"], body["policy"]) == ("invalid_body", "5;w=60;u=cents")
    assert "'stream'" in body["reason"]
    assert (requests["error_code"], requests["policy"]) == ("rate_limited", "1;w=60")
    assert requests["reason"].startswith("1;w=60: 1 of 1 requests used; retry after ")
    assert requests["retry_after"] == int(requests["reason"].rsplit(" ", 2)[1]) > 0
    assert cents["policy"] == "1;w=120;u=cents" and cents["reason"].startswith("1;w=120;u=cents: 1.5")
    assert " of 1 cents used; retry after " in cents["reason"]
    assert shared["policy"] == "1;w=300" and "1 of 1 requests used (one counter with 60;w=300)" in shared["reason"]
    assert many["error_code"] == "invalid_rate_limit_policy" and many["policy"].startswith("1;w=60,1;w=60,")
    assert many["reason"] == "at most 20 policies per request, got 21"
    for line in lines:
        if line["status"] == 200:
            assert not {"error_code", "reason", "skipped"} & set(line)
    text = "\n".join(gateway.log_lines())
    assert key not in text and key.rsplit("_", 1)[1] not in text and PROVIDER_KEY not in text
    assert upstream.count() == 3


def test_a_hostile_policy_is_logged_inertly(serve: Callable[..., Gateway], upstream: FakeUpstream) -> None:
    """A policy carrying a bidi override and a C1 control (sent as UTF-8: the HTTP parser refuses
    C0 controls itself) is shown in the log line as JSON escapes."""
    gateway = serve("--workers", "1")
    hostile = "1;w=60;s=\u202eevil\u0085"
    headers = {b"Helicone-Auth": f"Bearer {gateway.key()}".encode(), POLICY.encode(): hostile.encode()}
    with gateway.http() as http:
        assert http.post("/v1/chat/completions", json=BODY, headers=headers).status_code == 400
    (raw,) = [line for line in gateway.log_lines() if '"quotagate.access"' in line]
    assert "\u202e" not in raw and "\x85" not in raw and "\\u202e" in raw
    assert orjson.loads(raw)["policy"] == hostile
    assert upstream.count() == 0


def test_what_ignore_leaves_out_is_logged(serve: Callable[..., Gateway], upstream: FakeUpstream) -> None:
    """Set by the environment; the access line lists each left-out policy with its code and problem."""
    gateway = serve("--workers", "1", env={"QUOTAGATE_ON_POLICY_ERROR": "ignore"})
    with gateway.http() as http:
        response = send(http, gateway.key(), "3;w=60, 10;w=5, 2;w=60;s=user")
    assert response.status_code == 200
    assert response.headers["x-helicone-error"] == "invalid_rate_limit_policy, missing_segment_value"
    (line,) = access_lines(gateway)
    window = "window w=5 is outside 60..31536000 seconds"
    assert line["skipped"][0] == {"code": "invalid_rate_limit_policy", "policy": "10;w=5", "problem": window}
    assert line["skipped"][1]["code"] == "missing_segment_value" and len(line["skipped"]) == 2
    assert line["skipped"][1]["policy"] == "2;w=60;s=user"
    assert "Helicone-User-Id" in line["skipped"][1]["problem"]
    assert upstream.count() == 1


def test_without_an_access_log_a_skip_is_a_warning(serve: Callable[..., Gateway], upstream: FakeUpstream) -> None:
    gateway = serve("--workers", "1", "--no-access-log", "--on-policy-error", "ignore")
    with gateway.http() as http:
        assert send(http, gateway.key(), "3;w=60;s=team").status_code == 200
        assert send(http, gateway.key("other"), "3;w=60").status_code == 200
    lines = [orjson.loads(line) for line in gateway.log_lines() if line.startswith("{")]
    assert not [line for line in lines if line["logger"] == "quotagate.access"]
    (warning,) = [line for line in lines if "skipped" in line]
    assert warning["level"] == "warning" and warning["skipped"][0]["policy"] == "3;w=60;s=team"
    assert upstream.count() == 2


# --- the setting -------------------------------------------------------------------------------------


def test_on_policy_error_is_a_choice(tmp_path: Path) -> None:
    result = cli("serve", "--on-policy-error", "sometimes", check=False)
    assert result.returncode == 2 and "'sometimes' is not one of 'reject', 'ignore'" in result.stderr
    result = cli("serve", env={"QUOTAGATE_ON_POLICY_ERROR": "skip"}, check=False)
    assert result.returncode == 2 and "from QUOTAGATE_ON_POLICY_ERROR" in result.stderr
    assert Settings(workers=1, on_policy_error="Ignore").on_policy_error == "ignore"
    config = tmp_path / "quotagate.toml"
    config.write_text('on_policy_error = "skip"\n')
    with pytest.raises(ConfigError, match=r"quotagate.toml: on_policy_error must be one of 'reject', 'ignore'"):
        load_file(config)
    config.write_text('on_policy_error = "ignore"\n')
    assert load_file(config)["on_policy_error"] == "ignore"
    assert "--on-policy-error [reject|ignore]" in cli("serve", "--help").stdout
