"""What other tools see: DNS-SD records resolvable by a standard resolver, a terminal view."""

from __future__ import annotations

import os
import pty
import re
import select
import subprocess

from tests.helpers import command, run, wait_until


def test_dns_sd_records_resolve_with_a_generic_dns_sd_browser(procs):
    """A plain DNS-SD browse/resolve (python-zeroconf's, as avahi-browse -r would do)."""
    from zeroconf import ServiceBrowser, ServiceInfo, Zeroconf

    sub = procs.sub_ready("orders.>", "logs.*")
    subid = re.search(r"announced as (\w+)", sub.stderr).group(1)
    port = int(re.search(r"listening on tcp://[^:]+:(\d+)", sub.stderr).group(1))
    zc = Zeroconf(interfaces=["127.0.0.1"])
    try:
        names: list[str] = []
        browser = ServiceBrowser(zc, "_eda-sub._tcp.local.", handlers=[lambda **kw: names.append(kw["name"])])
        name = wait_until(lambda: next((n for n in names if subid in n), None), 10, "browse result")
        browser.cancel()
        info = ServiceInfo("_eda-sub._tcp.local.", name)
        assert info.request(zc, 3000)
        assert info.port == port
        assert info.properties[b"id"] == subid.encode()
        assert info.properties[b"p"] == b"orders.> logs.*"
        assert "127.0.0.1" in info.parsed_addresses()
    finally:
        zc.close()


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
            while select.select([leader], [], [], 0.2)[0]:
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
