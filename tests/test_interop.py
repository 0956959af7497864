"""What other tools see: DNS-SD records resolvable by a foreign resolver (dig), a terminal view."""

from __future__ import annotations

import os
import pty
import subprocess

from tests.helpers import command, readable, require_tools, run, wait_until


def _dig(name: str, rtype: str) -> list[str]:
    """Ask the mDNS responder on this host directly (RFC 6762 5.5), as a plain DNS client."""
    out = subprocess.run(
        ["dig", "-p", "5353", "@127.0.0.1", name, rtype, "+short", "+time=2", "+tries=2"],
        capture_output=True,
        text=True,
        timeout=20,
    )
    return out.stdout.splitlines()


def test_dns_sd_records_resolve_with_a_foreign_dns_client(procs):
    """dig (BIND's resolver, no mDNS library in common with eda) resolves PTR, SRV, TXT and A."""
    require_tools("dig", install="bind9-dnsutils")
    sub = procs.sub_ready("orders.>", "logs.*")
    subid = sub.wait_stderr(r"announced as (\w+)", 15).group(1)
    # (announced at once, without probing: "listening on" may follow it)
    port = int(sub.wait_stderr(r"listening on tcp://[^:]+:(\d+)", 15).group(1))
    name = wait_until(
        lambda: next((n for n in _dig("_eda-sub._tcp.local", "PTR") if subid in n), None),
        10,
        "dig to list the subscriber",
    )
    [srv] = _dig(name, "SRV")
    _priority, _weight, srv_port, target = srv.split()
    assert int(srv_port) == port
    assert _dig(name, "TXT") == [f'"id={subid}" "p=orders.> logs.*" "v=1"']
    assert "127.0.0.1" in _dig(target, "A")


def test_terminal_view_is_coloured_and_readable(procs):
    sub = procs.sub_ready("t", "-C", "1", "--json")  # a witness that the event went out
    leader, follower = pty.openpty()
    err = open(os.devnull, "wb")  # noqa: SIM115
    proc = subprocess.Popen(command("eda-sub", "t", "-C", "1"), stdout=follower, stderr=err)
    os.close(follower)
    output = b""
    try:

        def received() -> bool:
            nonlocal output
            if run("eda-pub", "t", "on a terminal").returncode != 0:
                return False
            while readable([leader], 0.2):
                try:
                    output += os.read(leader, 4096)
                except OSError:
                    break
            return b"on a terminal" in output

        wait_until(received, 20, "terminal output")
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(leader)
        err.close()
    assert b"\x1b[" in output  # colour on a terminal
    assert not output.lstrip().startswith(b"{")  # not JSON
    assert b"t" in output and sub.wait() == 0


def test_interface_by_name_and_by_address(procs):
    sub = procs.sub_ready("t", "-C", "1", "--interface", "127.0.0.1")
    result = run("eda-pub", "--interface", "lo", "t", "via lo")
    assert result.returncode == 0, result.stderr
    assert sub.wait() == 0 and "via lo" in sub.stdout
    bad = run("eda-pub", "--interface", "nosuch0", "t", "x")
    assert bad.returncode == 2 and "no IPv4 address on interface 'nosuch0'" in bad.stderr
