"""Everyday operations: service counts, removing a stuck instance, exit codes, completions."""

from __future__ import annotations

import json
import re

from tests.helpers import Procs, run, wait_until
from tests.test_registry import register, run_on_tty, serve


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
