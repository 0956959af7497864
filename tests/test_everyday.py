"""Everyday operations: service counts, removing a stuck instance, exit codes, completions."""

from __future__ import annotations

import json
import re
import signal
from pathlib import Path

import pytest

from tests import helpers
from tests.helpers import Proc, Procs, run, wait_until
from tests.test_registry import (
    events,
    lookup,
    ports,
    register,
    register_raw,
    run_on_tty,
    serve,
    watch,
)

helpers.PROGRAMS.setdefault("eda-txn", "eda.cli.txn")
helpers.PROGRAMS.setdefault("eda-lb", "eda.cli.lb")


def test_services_counts_instances_and_passing_ones(procs: Procs) -> None:
    _, ep = serve(procs)
    register(procs, ep, "orders", 8080)
    register(procs, ep, "orders", 8081, "--check", "exit 1")
    register(procs, ep, "billing", 9000)
    def listed() -> list[dict[str, object]]:
        result = run("eda-registry", "services", "--registry", ep)
        assert (result.returncode, result.stderr) == (0, "")
        return [json.loads(line) for line in result.stdout.splitlines()]

    wait_until(lambda: listed()[1]["passing"] == 1, what="the failing instance marked")
    assert listed() == [
        {"service": "billing", "instances": 1, "passing": 1},
        {"service": "orders", "instances": 2, "passing": 1},
    ]
    result = run(
        "eda-registry", "services", "--registry", ep, "--format", "{service} {passing}/{instances}"
    )
    assert (result.returncode, result.stdout) == (0, "billing 1/1\norders 1/2\n")
    code, out, err = run_on_tty("services", "--registry", ep)
    assert (code, err) == (0, "")
    plain = re.sub(r"\x1b\[[0-9;]*m", "", out)
    assert re.search(r"SERVICE\s+INSTANCES\s+PASSING", plain)
    assert re.search(r"orders\s+2\s+1/2", plain) and re.search(r"billing\s+1\s+1/1", plain)
    refused = run("eda-registry", "services", "--registry", ep, "--format", "{port}")
    assert refused.returncode == 2 and refused.stdout == ""


def test_services_of_an_empty_registry_prints_nothing(procs: Procs) -> None:
    _, ep = serve(procs)
    result = run("eda-registry", "services", "--registry", ep)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def test_deregister_removes_a_stuck_instance_and_exits_3_for_an_unknown_one(
    procs: Procs,
) -> None:
    _, ep = serve(procs)
    w = watch(procs, ep, "orders")
    # a stuck entry: registered with a long TTL by an owner that died without deregistering
    register_raw(ep, [{"service": "orders", "id": "stuck-1", "host": "10.0.0.9", "port": 8080,
                       "ttl": 3600, "interval": 60}])  # fmt: skip
    kept = register(procs, ep, "orders", 8081, "--id", "kept-1")
    gone = run("eda-registry", "deregister", "stuck-1", "--registry", ep)
    assert (gone.returncode, gone.stdout, gone.stderr) == (0, "", "")
    assert ports(lookup(ep, "orders", "--all")) == [8081]  # at once, not after the TTL
    again = run("eda-registry", "deregister", "stuck-1", "--registry", ep)
    assert (again.returncode, again.stdout) == (3, "")
    assert again.stderr.startswith("eda-registry: error: ") and "stuck-1" in again.stderr
    bad = run("eda-registry", "deregister", "no such id", "--registry", ep)
    assert (bad.returncode, bad.stdout) == (2, "")
    assert bad.stderr.count("\n") == 1 and "instance id" in bad.stderr
    w.wait_lines(3)
    seen = [(e["type"], e["instance"]["id"], e["reason"]) for e in events(w)]  # type: ignore[index]
    assert seen[-1] == ("deregistered", "stuck-1", "deregistered by an operator")
    assert kept.popen.poll() is None and ports(lookup(ep, "orders")) == [8081]


# -- exit codes --------------------------------------------------------------------------
def _stopped_by(proc: Proc, sig: int) -> int:
    proc.signal(sig)
    return proc.wait()


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 0)])
def test_a_daemon_stopped_by_sigint_exits_130_and_by_sigterm_0(
    procs: Procs, tmp_path: Path, sig: int, code: int
) -> None:
    bus = procs.eda("eda-bus", "serve", "--data", str(tmp_path / "bus"), "--no-mdns",
                    "--bind", "tcp://127.0.0.1:0")  # fmt: skip
    bus.wait_stderr(r"serving .+ on tcp://", 15)
    worker = procs.eda("eda-lb", "worker", "svc", "--no-mdns", "--bind", "tcp://127.0.0.1:*",
                       "--persistent", "--", "cat")  # fmt: skip
    worker.wait_stderr("serving svc", 15)
    coordinator = procs.eda("eda-txn", "coordinator", "--name", "c1", "--log",
                            str(tmp_path / "txn"), "--no-mdns", "-v",
                            "--bind", "tcp://127.0.0.1:0")  # fmt: skip
    coordinator.wait_stderr("coordinator c1 listening", 15)
    assert _stopped_by(bus, sig) == code, bus.stderr
    assert _stopped_by(worker, sig) == code, worker.stderr
    assert _stopped_by(coordinator, sig) == code, coordinator.stderr
    assert "Traceback" not in bus.stderr + worker.stderr + coordinator.stderr


@pytest.mark.parametrize("interface", ["nosuch0", "10.9.9.9"])
def test_an_interface_this_host_does_not_have_is_a_usage_error(
    tmp_path: Path, interface: str
) -> None:
    for argv in (
        ["eda-registry", "lookup", "orders", "--interface", interface],
        ["eda-pub", "--interface", interface, "t", "x"],
        ["eda-bus", "serve", "--data", str(tmp_path), "--no-mdns", "--interface", interface],
    ):
        result = run(*argv)
        assert (result.returncode, result.stdout) == (2, ""), (argv, result.stderr)
        assert result.stderr.count("\n") == 1 and interface in result.stderr, result.stderr


def test_txn_resolve_with_both_outcomes_is_a_usage_error(tmp_path: Path) -> None:
    log = str(tmp_path / "txn")
    both = run("eda-txn", "resolve", "shop.0123abcd", "--commit", "--abort", "--log", log, "--no-mdns")
    assert (both.returncode, both.stdout) == (2, "")
    assert both.stderr.count("\n") == 1 and "--commit and --abort" in both.stderr
    neither = run("eda-txn", "resolve", "shop.0123abcd", "--log", log, "--no-mdns")
    assert (neither.returncode, neither.stdout) == (2, "")
    assert "say --commit or --abort" in neither.stderr
    one = run("eda-txn", "resolve", "shop.0123abcd", "--commit", "--log", log, "--no-mdns")
    assert one.returncode == 3, one.stderr  # checked, then nothing in doubt: not found
