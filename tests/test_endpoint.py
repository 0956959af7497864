"""The one endpoint parser (core/endpoint.py): what it takes, what it refuses, how it writes."""

from __future__ import annotations

import pytest

from eda.core.endpoint import Endpoint
from eda.core.errors import UsageError


@pytest.mark.parametrize(
    ("text", "host", "port"),
    [
        ("tcp://127.0.0.1:5555", "127.0.0.1", 5555),
        ("127.0.0.1:5555", "127.0.0.1", 5555),
        ("host-a.lan:1", "host-a.lan", 1),
        ("tcp://[::1]:6000", "::1", 6000),
        ("[fe80::1]:65535", "fe80::1", 65535),
        ("tcp://*:*", "*", 0),
        ("*:0", "*", 0),
    ],
)
def test_accepted_forms_parse_to_host_and_port(text: str, host: str, port: int) -> None:
    assert Endpoint.parse(text) == Endpoint(host, port)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "127.0.0.1",  # no port, none defaulted
        "127.0.0.1:65536",
        "127.0.0.1:000070000",
        "127.0.0.1:-1",
        "127.0.0.1:http",
        "::1:5555",  # bare IPv6: ambiguous
        "[::1:5555",
        "[127.0.0.1]:80",  # brackets are for IPv6
        "[nothex]:80",
        "ipc:///tmp/x",
        "udp://1.2.3.4:5",
        "bad host:1",
        "h\u00e9:1",
        "x" * 400 + ":1",
        ":5555",  # no host, none defaulted
    ],
)
def test_malformed_endpoints_are_one_line_usage_errors(text: str) -> None:
    with pytest.raises(UsageError) as info:
        Endpoint.parse(text, "bus")
    message = str(info.value)
    assert "\n" not in message and message.startswith("bad bus endpoint")
    assert Endpoint.from_peer(text) is None


def test_defaults_fill_a_missing_host_or_port() -> None:
    assert Endpoint.parse(":8080", default_host="0.0.0.0") == Endpoint("0.0.0.0", 8080)
    assert Endpoint.parse("example.lan", default_port=7777) == Endpoint("example.lan", 7777)
    assert Endpoint.parse("[::1]", default_port=7) == Endpoint("::1", 7)


def test_written_forms_round_trip() -> None:
    for text in ("tcp://10.0.0.1:5", "tcp://[::1]:6000", "tcp://name.lan:65535"):
        ep = Endpoint.parse(text)
        assert ep.zmq == text
        assert Endpoint.parse(str(ep)) == ep
    assert Endpoint("*", 0).zmq == "tcp://*:*"
    assert str(Endpoint("::1", 80)) == "[::1]:80"


def test_a_peer_cannot_hand_out_a_wildcard_or_port_zero() -> None:
    assert Endpoint.from_peer("tcp://*:5555") is None
    assert Endpoint.from_peer("tcp://10.0.0.1:0") is None
    assert Endpoint.from_peer(5555) is None
    assert Endpoint.from_peer("tcp://10.0.0.1:5555") == Endpoint("10.0.0.1", 5555)
