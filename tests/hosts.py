"""Several "hosts" on one machine: network namespaces joined by a bridge.

Each host is a network namespace held open by a sleeping process, with a
veth pair to a bridge in the test's own (already private) namespace and an
address in 10.231.0.0/24.  Tests start programs on a host, kill a host's
processes, or cut its cable.  Nothing here can reach a real interface: the
bridge lives inside the namespace the suite runs in.
"""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from tests.helpers import Proc, Procs, command

_ids = itertools.count(1)


def ip(*args: str, netns_pid: int | None = None) -> None:
    prefix = ["nsenter", f"--net=/proc/{netns_pid}/ns/net"] if netns_pid else []
    subprocess.run([*prefix, "ip", *args], check=True, capture_output=True)


@dataclass
class Host:
    name: str
    address: str
    holder: subprocess.Popen[bytes]
    link: str  # the veth end on the bridge side
    procs: Procs
    started: list[Proc] = field(default_factory=list)
    commands: dict[int, tuple[list[str], dict[str, Any]]] = field(default_factory=dict)

    @property
    def prefix(self) -> list[str]:
        return ["nsenter", f"--net=/proc/{self.holder.pid}/ns/net"]

    def _env(self, kw: dict[str, Any]) -> dict[str, Any]:
        """Each host has its own disk: its own discovery cache."""
        cache = str(self.procs.workdir / f"cache-{self.name}")
        return {**kw, "env": {"XDG_CACHE_HOME": cache, **(kw.get("env") or {})}}

    def eda(self, program: str, *args: str, **kw: Any) -> Proc:
        argv = command(program, *args)
        proc = self.procs.start(argv, prefix=self.prefix, **self._env(kw))
        self.started.append(proc)
        self.commands[id(proc)] = (argv, kw)
        return proc

    def restart(self, proc: Proc) -> Proc:
        """Start *proc*'s command again on this host (after a crash): a new Proc."""
        argv, kw = self.commands[id(proc)]
        proc.kill()
        again = self.procs.start(argv, prefix=self.prefix, **self._env(kw))
        self.started.append(again)
        self.commands[id(again)] = (argv, kw)
        return again

    @staticmethod
    def stop(proc: Proc) -> None:
        """Freeze *proc* (SIGSTOP): it holds its sockets and answers nothing."""
        proc.signal(signal.SIGSTOP)

    @staticmethod
    def cont(proc: Proc) -> None:
        proc.signal(signal.SIGCONT)

    def sub_ready(self, *args: str, **kw: Any) -> Proc:
        proc = self.eda("eda-sub", "-v", *args, **kw)
        proc.wait_stderr("announced as", 15)
        return proc

    def run(self, program: str, *args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
        from tests.helpers import run

        return run(program, *args, prefix=self.prefix, **self._env(kw))

    def set_input_loss(self, percent: int, protocols: Sequence[str] = ("udp",)) -> None:
        """Drop *percent* % of the packets of *protocols* this host receives (0: none).

        An nftables rule in the host's namespace (``numgen random``), on input
        only, as a Wi-Fi station misses multicast (a drop on output would make
        sendto fail with EPERM, which no real network does); by default UDP
        only, TCP left alone; ``("udp", "tcp")`` drops both.
        """
        rules = " ".join(
            f'iifname != "lo" meta l4proto {proto} numgen random mod 100 < {int(percent)} drop;'
            for proto in protocols
        )
        self._input_table("edaloss", rules if percent > 0 else "")

    def block_from(self, addresses: Sequence[str]) -> None:
        """Hear nothing from *addresses* (empty: heal): one side of a partition.

        Input only, as :meth:`set_input_loss`; each side of a partition drops
        what the other sends, so neither hears the other, TCP nor mDNS.
        """
        rules = f"ip saddr {{ {', '.join(addresses)} }} drop;" if addresses else ""
        self._input_table("edapart", rules)

    def _input_table(self, table: str, rules: str) -> None:
        """Replace this host's nftables table *table* by an input chain of *rules*."""
        from tests.helpers import require_tools

        require_tools("nft", install="nftables")
        nft = [*self.prefix, "nft"]
        subprocess.run([*nft, "delete", "table", "inet", table], capture_output=True)
        if not rules:
            return
        text = (
            f"table inet {table} {{ chain input {{ type filter hook input priority 0; "
            f"{rules} }}; }}"
        )
        subprocess.run([*nft, "-f", "-"], input=text.encode(), check=True, capture_output=True)

    def cut(self) -> None:
        """Pull the cable: the host keeps running but hears nothing."""
        ip("link", "set", self.link, "down")

    def reconnect(self) -> None:
        ip("link", "set", self.link, "up")

    def kill(self) -> None:
        """Power off: SIGKILL every process started on the host."""
        for proc in self.started:
            proc.signal(signal.SIGKILL)


class Network:
    """A bridge and the hosts attached to it."""

    def __init__(self, procs: Procs) -> None:
        self.procs = procs
        self.net = next(_ids)
        self.bridge = f"edabr{self.net}"
        self.hosts: list[Host] = []
        ip("link", "add", self.bridge, "type", "bridge")
        ip("link", "set", self.bridge, "up")

    def add_host(self, name: str) -> Host:
        n = len(self.hosts) + 2
        holder = subprocess.Popen(["unshare", "--net", "sleep", "infinity"])
        ns = f"/proc/{holder.pid}/ns/net"
        # unshare has exec'd sleep once the namespace differs from ours (polled, not
        # spun: a spinning test process takes the CPU the starting unshare needs)
        while os.readlink(ns) == os.readlink("/proc/self/ns/net"):
            if holder.poll() is not None:
                raise RuntimeError("could not create a network namespace")
            time.sleep(0.002)
        outer, inner = f"edav{self.net}h{n}", f"edav{self.net}i{n}"
        ip("link", "add", outer, "type", "veth", "peer", "name", inner)
        ip("link", "set", inner, "netns", str(holder.pid))
        ip("link", "set", outer, "master", self.bridge)
        ip("link", "set", outer, "up")
        address = f"10.231.{self.net}.{n}"
        for args in (
            ("link", "set", "lo", "up"),
            ("addr", "add", f"{address}/24", "dev", inner),
            ("link", "set", inner, "multicast", "on"),
            ("link", "set", inner, "up"),
            ("route", "add", "224.0.0.0/4", "dev", inner),
        ):
            ip(*args, netns_pid=holder.pid)
        host = Host(name, address, holder, outer, self.procs)
        self.hosts.append(host)
        return host

    def split(self, half: Sequence[Host]) -> None:
        """Split the bridge in two: *half* and the other hosts no longer hear each other."""
        inside = [h for h in self.hosts if h in half]
        outside = [h for h in self.hosts if h not in half]
        for here, there in ((inside, outside), (outside, inside)):
            for host in here:
                host.block_from([h.address for h in there])

    def join(self) -> None:
        """Heal a :meth:`split`."""
        for host in self.hosts:
            host.block_from([])

    def close(self) -> None:
        for host in self.hosts:
            host.kill()
            host.holder.kill()
            host.holder.wait(5)
        subprocess.run(["ip", "link", "del", self.bridge], check=False, capture_output=True)
