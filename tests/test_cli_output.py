"""The output layer and the shared options, in-process: terminal views are drawn for
an injected Environment (an 80-column terminal, a pipe), without a pty."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner

from eda.cli.common import Context
from eda.cli.output import Environment, Output

ANSI = re.compile(r"\x1b\[[0-9;]*m")
SERVICES = [
    {"service": "orders", "instances": 3, "passing": 3},
    {"service": "payments-" + "x" * 90, "instances": 2, "passing": 1},
    {"service": "\x1b]0;pwned\x07mail", "instances": 1, "passing": 0},
]


def render(
    rows: list[dict[str, Any]], *, tty: bool, width: int, colour: bool | None = None, **kw: Any
) -> str:
    from eda.cli.registry import _services_table

    screen = bytearray()
    env = Environment(write=screen.extend, stdout_isatty=tty, width=width, colour=colour)
    Output(Context("t", False), env=env, **kw).table(rows, _services_table)
    return screen.decode()


def test_a_table_on_an_80_column_terminal_fits_and_is_coloured() -> None:
    shown = render(SERVICES, tty=True, width=80, colour=True)
    assert ANSI.search(shown), shown  # the passing counts are coloured
    plain = ANSI.sub("", shown)
    lines = plain.splitlines()
    assert lines[0].split() == ["SERVICE", "INSTANCES", "PASSING"]
    assert all(len(line) <= 80 for line in lines), lines
    assert "payments-" in plain and "3/3" in plain and "0/1" in plain
    assert "\x1b]" not in shown and "\\x1b]0;pwned" in plain  # a peer's escape is shown, not run


def test_a_terminal_without_colour_gets_no_ansi() -> None:
    shown = render(SERVICES, tty=True, width=80, colour=False)
    assert "\x1b" not in shown.replace("\\x1b", "")
    assert shown.splitlines()[0].split() == ["SERVICE", "INSTANCES", "PASSING"]


def test_a_pipe_gets_json_lines_with_stable_columns_whatever_the_width() -> None:
    narrow = render(SERVICES, tty=False, width=40)
    wide = render(SERVICES, tty=False, width=200)
    assert narrow == wide and "\x1b" not in narrow
    rows = [json.loads(line) for line in narrow.splitlines()]
    assert rows == SERVICES
    assert [list(r) for r in rows] == [["service", "instances", "passing"]] * 3


def test_json_and_a_template_win_over_the_terminal_view() -> None:
    forced = render(SERVICES[:1], tty=True, width=80, force_json=True)
    assert json.loads(forced) == SERVICES[0]
    line = render(
        SERVICES[:1], tty=True, width=80, template="{service} {passing}/{instances}",
        fields=("service", "instances", "passing"),
    )  # fmt: skip
    assert line == "orders 3/3\n"


def test_items_with_a_terminal_view_are_drawn_in_one_write() -> None:
    from rich.text import Text

    writes: list[bytes] = []
    env = Environment(write=writes.append, stdout_isatty=True, width=80, colour=False)
    out = Output(Context("t", False), env=env, terminal=lambda item: Text(str(item["n"])))
    assert out.mode == "terminal"
    out.items([{"n": 1}, {"n": 2}])
    assert writes == [b"1\n2\n"]


def test_every_table_of_every_program_draws_for_an_injected_terminal() -> None:
    from eda.cli import bus, lb, txn

    cases: list[tuple[Any, list[dict[str, Any]], str]] = [
        (bus._table, [{"kind": "topic", "topic": "t", "events": 5, "bytes": 9}], "events"),
        (bus._consumer_table, [{"kind": "consumer", "consumer": "durable", "name": "d",
                                "patterns": ["a.>"], "next": 3, "lag": 0}], "patterns"),
        (lb._stats_table, lb._stats_rows("s", "b1", {"instances": [{"id": "w1"}]}, broker=True),
         "p99_ms"),
        (txn._status_table, [{"txn": "c1.1", "kind": "2pc", "state": "committed"}], "STATE"),
    ]  # fmt: skip
    for draw, rows, header in cases:
        screen = bytearray()
        env = Environment(write=screen.extend, stdout_isatty=True, width=80, colour=False)
        Output(Context("t", False), env=env).table(rows, draw)
        assert header in screen.decode(), (draw, screen.decode())


def test_the_environment_of_a_process_follows_its_stdout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.stdout", io.StringIO())
    assert Environment().stdout_isatty is False


# -- shared options ------------------------------------------------------------------------


def _option(command: click.Command, name: str) -> click.Parameter:
    return next(p for p in command.params if p.name == name)


def test_health_check_options_are_one_definition_in_both_programs() -> None:
    from eda.cli import lb, registry

    register, tcp = registry.command.commands["register"], lb.command.commands["tcp"]
    for name in ("check_interval", "check_timeout", "rise", "fall"):
        mine, theirs = _option(register, name), _option(tcp, name)
        assert repr(mine.type) == repr(theirs.type) and mine.help == theirs.help, name
    # the defaults are each program's: a command check every 5 s, a TCP connect every second
    assert _option(register, "check_interval").default == 5.0
    assert _option(tcp, "check_interval").default == 1.0


def test_a_check_period_below_10_ms_is_refused_by_both_programs() -> None:
    from eda.cli import lb, registry

    runner = CliRunner()
    for command, args in (
        (registry.command, ["register", "x", "--port", "1", "--check-interval", "0.001"]),
        (lb.command, ["tcp", "--listen", ":1", "x", "--check-interval", "0.001"]),
    ):
        done = runner.invoke(command, args)
        assert done.exit_code == 2 and "--check-interval" in done.output, done.output


def test_every_strategy_option_offers_the_balancer_strategies() -> None:
    from eda.cli import lb
    from eda.core.lb.balancer import STRATEGIES

    for sub in ("call", "serve", "tcp"):
        choice = _option(lb.command.commands[sub], "strategy").type
        assert isinstance(choice, click.Choice) and tuple(choice.choices) == STRATEGIES


def test_endpoint_options_take_any_form_and_refuse_wildcards() -> None:
    from eda.cli.options import EndpointType
    from eda.core.endpoint import Endpoint

    kind = EndpointType("broker")
    assert kind.convert("tcp://10.0.0.5:7801", None, None) == Endpoint("10.0.0.5", 7801)
    assert kind.convert("[::1]:7801", None, None).zmq == "tcp://[::1]:7801"
    for bad in ("tcp://*:7801", "10.0.0.5:0", "ipc:///x", "10.0.0.5"):
        with pytest.raises(click.BadParameter, match="bad broker endpoint"):
            kind.convert(bad, None, None)


# -- logic moved to core -------------------------------------------------------------------


def test_data_is_inline_json_a_file_or_stdin(tmp_path: Path) -> None:
    from eda.core.errors import UsageError
    from eda.core.txn.data import read_data

    empty = io.BytesIO()
    assert read_data(None, empty) == {} and read_data('{"a": 1}', empty) == {"a": 1}
    (tmp_path / "d.json").write_text('{"order": 7}')
    assert read_data(f"@{tmp_path / 'd.json'}", empty) == {"order": 7}
    assert read_data("-", io.BytesIO(b'{"y": 1}')) == {"y": 1}
    for text, stdin, words in [
        ("[1]", b"", "must be a JSON object"),
        ("{nope", b"", "not valid JSON"),
        ('{"x": NaN}', b"", "not valid JSON"),
        ("@missing.json", b"", "--data @missing.json"),
        ("-", b'{"x": "\xff"}', "not UTF-8"),
        ("-", b'{"x": "' + b"y" * 100 + b'"}', "over 50 bytes"),
    ]:
        with pytest.raises(UsageError, match=re.escape(words)):
            read_data(text, io.BytesIO(stdin), limit=50)


def test_a_daemon_bound_to_a_wildcard_advertises_a_reachable_endpoint() -> None:
    from eda.core.txn.advertise import advertised

    assert advertised("tcp://10.0.0.5:7730", "10.0.0.9", None) == "tcp://10.0.0.5:7730"
    assert advertised("tcp://0.0.0.0:7730", "10.0.0.9", None) == "tcp://10.0.0.9:7730"
    assert advertised("tcp://*:7730", None, "10.0.0.7") == "tcp://10.0.0.7:7730"
    assert advertised("tcp://*:7730", None, None) == "tcp://127.0.0.1:7730"
    # an IPv6 host is bracketed (it was written tcp://fd00::9:7730, which is no endpoint)
    assert advertised("tcp://*:7730", "fd00::9", None) == "tcp://[fd00::9]:7730"


def test_a_broker_found_at_an_ipv6_address_is_served_at_a_bracketed_endpoint() -> None:
    from eda.core.endpoint import Endpoint
    from eda.core.lb.brokers import BrokerFinder
    from eda.core.registry.model import Instance

    def broker(host: str, backend: str) -> Instance:
        return Instance("upper", f"b-{host}", host, 7801, meta={"role": "broker", "backend": backend})

    class Found:
        def take(self) -> list[Instance]:
            return [broker("fd00::5", "7802"), broker("10.0.0.5", "7802"), broker("10.0.0.6", "x")]

        def close(self) -> None:
            pass

    find = BrokerFinder([Endpoint("10.0.0.1", 7000)], Found())  # type: ignore[arg-type]
    assert find() == ["tcp://10.0.0.1:7000", "tcp://[fd00::5]:7802", "tcp://10.0.0.5:7802"]
