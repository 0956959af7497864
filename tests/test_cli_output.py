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
    from eda.cli.registryviews import SERVICES_TABLE as _services_table

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
    from eda.cli import busadmin as bus  # (stats and its tables)
    from eda.cli import lbstats as lb
    from eda.cli import txnstatus

    cases: list[tuple[Any, list[dict[str, Any]], str]] = [
        (bus._table, [{"kind": "topic", "topic": "t", "events": 5, "bytes": 9}], "events"),
        (bus._consumer_table, [{"kind": "consumer", "consumer": "durable", "name": "d",
                                "patterns": ["a.>"], "next": 3, "lag": 0}], "patterns"),
        (lb._stats_table, lb._stats_rows("s", "b1", {"instances": [{"id": "w1"}]}, broker=True),
         "p99_ms"),
        (txnstatus._status_table, [{"txn": "c1.1", "kind": "2pc", "state": "committed"}], "STATE"),
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


def test_an_instance_id_option_reads_the_same_in_every_command_that_registers() -> None:
    """--id of eda-lb worker, eda-lb serve and eda-registry register: one definition (the
    worker's said 'TEXT' and '[default: ...]' where the others said 'ID', '(default: ...)')."""
    from eda.cli import lb, registry

    commands = [lb.command.commands["worker"], lb.command.commands["serve"],
                registry.command.commands["register"]]  # fmt: skip
    options = [_option(command, "inst_id") for command in commands]
    for option in options:
        assert isinstance(option, click.Option)
        assert (option.opts, option.metavar, option.help) == (
            options[0].opts, "ID", "Instance id (default: NAME-HOST-PORT)."
        )


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


# -- tables at 80 and 60 columns (issue 16) ------------------------------------------------


def _tables() -> list[tuple[str, Any, list[dict[str, Any]], list[str]]]:
    """Every table of every program, with realistic widths, and the values (ids,
    counts, addresses) each must show whole."""
    from eda.cli import busadmin as bus  # (stats and its tables)
    from eda.cli import lbstats as lb
    from eda.cli import registryviews, txnstatus

    worker = {
        "id": "upper-10-200-200-200-40123", "state": "slow-start", "requests": 1234567,
        "errors": 12345, "inflight": 64, "concurrency": 128, "weight": 100,
        "latency_ms": {"p50": 12.345, "p90": 123.456, "p99": 1234.567},
    }  # fmt: skip
    lb_rows = lb._stats_rows("upper", "broker-10-0-0-1-5555", {"instances": [worker]}, broker=True)
    instance = {
        "service": "orders", "id": "orders-10-200-200-200-65535", "host": "10.200.200.200",
        "port": 65535, "status": "passing", "weight": 3, "meta": {"zone": "a", "version": "1.2"},
        "heartbeat": 0,
    }  # fmt: skip
    return [
        ("eda-lb stats", lb._stats_table, lb_rows,
         ["upper-10-200-200-200-40123", "1234567", "12345"]),
        ("eda-bus stats", bus._table,
         [{"kind": "bus", "events": 2000201, "bytes": 123456789012, "first_seq": 1,
           "last_seq": 2000201},
          {"kind": "topic", "topic": "orders.created.eu-west", "events": 1000000,
           "bytes": 61234567890},
          {"kind": "consumer", "consumer": "durable", "name": "billing-eu-west-1",
           "next": 1999990, "lag": 1000211, "held": 1000}],
         ["2000201", "1000000", "orders.created.eu-west", "billing-eu-west-1", "1000211"]),
        ("eda-bus stats --consumers", bus._consumer_table,
         [{"kind": "consumer", "consumer": "group", "name": "billing-eu-west-1",
           "patterns": ["orders.>", "payments.*.settled"], "next": 1999990, "lag": 1000211,
           "held": 1000}],
         ["billing-eu-west-1", "1000211"]),
        ("eda-txn status", txnstatus._status_table,
         [{"txn": "coordinator-1.18f3a2b4c5d6e7", "kind": "2pc", "state": "committing",
           "participants": {"stock": "committed", "payments": "prepared"}, "time": 0,
           "reason": "", "notes": ["payments: commit failing: connection refused"]},
          {"txn": "order-20261207-083512-a1b2c3", "kind": "saga", "state": "compensated",
           "steps": {"reserve": "compensated", "charge": "failed"}, "time": 0,
           "reason": "charge: card declined"}],
         ["coordinator-1.18f3a2b4c5d6e7", "committing", "order-20261207-083512-a1b2c3",
          "compensated"]),
        ("eda-registry list", registryviews.INSTANCES_TABLE,
         [instance, {**instance, "id": "orders-10-200-200-201-65535", "host": "10.200.200.201"}],
         ["orders-10-200-200-200-65535", "10.200.200.200:65535", "10.200.200.201:65535"]),
        ("eda-registry services", registryviews.SERVICES_TABLE,
         [{"service": "orders", "instances": 120000, "passing": 119999}], ["120000"]),
    ]  # fmt: skip


@pytest.mark.parametrize("width", [80, 60])
def test_every_table_fits_the_terminal_without_splitting_an_id_or_a_number(width: int) -> None:
    for program, view, rows, whole in _tables():
        screen = bytearray()
        env = Environment(write=screen.extend, stdout_isatty=True, width=width, colour=False)
        Output(Context("t", False), env=env).table(rows, view)
        lines = screen.decode().splitlines()
        assert all(len(line) <= width for line in lines), (program, lines)
        tokens = {token for line in lines for token in line.split()}
        for value in whole:  # every id, count and address whole on one line
            assert value in tokens, (program, width, value, lines)
        headers = {c.header for c in view.columns}
        text = " ".join(lines)
        shown = {h for h in headers if any(h in line for line in lines[:3])}
        if shown != headers:  # a column dropped is named, and --json still has it
            note = text[text.index("hidden to fit") :]
            assert "--json" in note and all(h in note for h in headers - shown), (program, lines)


def test_the_most_important_columns_stay_on_a_narrow_terminal() -> None:
    from eda.cli import lbstats as lb

    rows = _tables()[0][2]
    screen = bytearray()
    env = Environment(write=screen.extend, stdout_isatty=True, width=60, colour=False)
    Output(Context("t", False), env=env).table(rows, lb._stats_table)
    header = next(line for line in screen.decode().splitlines() if "instance" in line).split()
    assert header[:4] == ["instance", "state", "requests", "errors"]
    assert "p90_ms" not in header  # the least needed went first


def test_an_empty_bus_says_empty_not_a_backwards_range() -> None:
    from eda.cli import busadmin as bus  # (stats and retain)

    screen = bytearray()
    env = Environment(write=screen.extend, stdout_isatty=True, width=80, colour=False)
    empty = {"kind": "bus", "events": 0, "bytes": 0, "first_seq": 1, "last_seq": 0}
    Output(Context("t", False), env=env).table([empty], bus._table)
    assert "empty" in screen.decode() and "1..0" not in screen.decode()


def test_browse_templates_take_meta_as_its_help_says() -> None:
    from eda.cli import registrywatch as registry  # browse's module

    item = {"event": "added", "name": "web", "addresses": ["10.0.0.5"], "port": 80,
            "txt": {"zone": "a"}}  # fmt: skip
    out = bytearray()
    env = Environment(write=out.extend, stdout_isatty=False)
    Output(Context("t", False), env=env, template="{meta[zone]} {meta}", fields=registry.BROWSE_FIELDS,
           template_fields=registry.browse_fields).items([item])  # fmt: skip
    assert out.decode() == 'a {"zone":"a"}\n'
    assert "{meta}" in registry.browse.get_help(click.Context(registry.browse))


def test_durations_print_as_they_are_written() -> None:
    from eda.core.bus.retention import format_age, parse_age

    assert [format_age(s) for s in (604800, 2592000, 3600, 5400, 90, 1.5)] == [
        "7d", "30d", "1h", "90m", "90s", "1.5s"
    ]  # fmt: skip
    for text in ("7d", "12h", "30m", "90s", "0.5s", "2w"):
        assert parse_age(format_age(parse_age(text))) == parse_age(text)


def test_retain_says_what_it_did_in_words_on_a_terminal_and_json_on_a_pipe() -> None:
    from eda.cli import busadmin as bus  # (stats and retain)

    done = {"removed": 5, "bytes": 600, "first_seq": 6}
    for tty, expected in ((True, "removed 5 events (600 bytes); the log now starts at seq 6\n"),
                          (False, '{"removed":5,"bytes":600,"first_seq":6}\n')):  # fmt: skip
        screen = bytearray()
        env = Environment(write=screen.extend, stdout_isatty=tty, width=80, colour=False)
        Output(Context("t", False), env=env, terminal=bus._retained_line).items([done])
        assert screen.decode() == expected
