"""Helpers for tests: processes with captured output, conditions with deadlines."""

from __future__ import annotations

import os
import re
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from eda.core import keys


def readable(files: Sequence[Any], timeout: float) -> list[Any]:
    """Those of *files* (objects with fileno() or descriptors) readable within *timeout* s.

    select.select cannot take a descriptor above 1023, which a long-lived test
    worker reaches; poll(2) has no such limit.
    """
    poller = select.poll()
    by_fd = {}
    for f in files:
        fd = f if isinstance(f, int) else f.fileno()
        by_fd[fd] = f
        poller.register(fd, select.POLLIN | select.POLLHUP | select.POLLERR)
    return [by_fd[fd] for fd, _ in poller.poll(max(0.0, timeout) * 1000)]


PROGRAMS = {
    "eda-pub": "eda.cli.pub",
    "eda-sub": "eda.cli.sub",
    "eda-registry": "eda.cli.registry",
    "eda-bus": "eda.cli.bus",
}


BIN = Path(__file__).resolve().parent.parent / "bin"


def command(program: str, *args: str) -> list[str]:
    """argv to run an eda program with this interpreter, as it is installed: its script
    in bin/ (pyproject.toml script-files), through eda.cli.launch.

    Not ``python -m eda.cli.X``: that is not how anyone runs eda, and it costs a fifth
    more CPU per one-shot command (the interpreter's teardown, which the launcher
    skips), thousands of times a run."""
    if not (BIN / program).is_file():
        raise KeyError(program)
    return [sys.executable, str(BIN / program), *args]


def require_tools(*tools: str, install: str) -> None:
    """Fail the test at once, naming the package to install, if a peer program is missing."""
    import pytest

    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        pytest.fail(
            f"{', '.join(missing)} not found: install {install} first "
            f"(Debian/Ubuntu: apt-get install {install})",
            pytrace=False,
        )


def wait_until(cond: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    """Poll *cond* until it returns something truthy; fail after *timeout* seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


def children_of(pid: int) -> list[str]:
    """Live (non-zombie) child processes of *pid*, as 'pid:name'."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(f"{entry}:{name}")
    return found


# how long a process may take to say something (that it is ready, mostly): a Python
# start-up and its imports took over 10 s on a 2-core CI box at load 25.  A deadline
# costs nothing when the line comes; it is only how long a failure takes to be said.
SAYS_WITHIN = 30.0


class Proc:
    """A started process whose stdout and stderr go to files the test can read."""

    def __init__(
        self,
        argv: Sequence[str],
        workdir: Path,
        n: int,
        stdin: Any,
        env: dict[str, str] | None,
        prefix: Sequence[str] = (),
    ) -> None:
        self.out_path = workdir / f"proc{n}.out"
        self._counted = [0, 0]  # bytes of stdout read by newlines(), newlines among them
        self.err_path = workdir / f"proc{n}.err"
        self._out = self.out_path.open("wb")
        self._err = self.err_path.open("wb")
        self.popen = subprocess.Popen(
            [*prefix, *argv],
            stdin=stdin,
            stdout=self._out,
            stderr=self._err,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )

    @property
    def stdout(self) -> str:
        return self.out_path.read_text(errors="replace")

    @property
    def stderr(self) -> str:
        return self.err_path.read_text(errors="replace")

    def lines(self) -> list[str]:
        return self.stdout.splitlines()

    def wait_stderr(self, pattern: str, timeout: float = SAYS_WITHIN) -> re.Match[str]:
        try:
            return wait_until(
                lambda: re.search(pattern, self.stderr), timeout, f"stderr ~ {pattern!r}"
            )
        except AssertionError as exc:  # what it said by the deadline, not when asked
            raise AssertionError(f"{exc}; got {self.stderr[-4000:]!r}") from None

    def newlines(self) -> int:
        """Lines ended on stdout so far, counted incrementally: only what was written
        since the last call is read (a poll of a long output does not read it whole)."""
        with self.out_path.open("rb") as fh:
            fh.seek(self._counted[0])
            while chunk := fh.read(1 << 20):
                self._counted[0] += len(chunk)
                self._counted[1] += chunk.count(b"\n")
        return self._counted[1]

    def wait_lines(self, n: int, timeout: float = SAYS_WITHIN) -> list[str]:
        """Wait for *n* lines on stdout (as :meth:`lines` counts them); all of them.

        Polled with :meth:`newlines` (a million lines read again every 20 ms was most
        of a test's time): each newline ends a line, so n of them are n lines.
        """

        def enough() -> bool:
            if self.newlines() >= n:
                return True
            # short: read whole, for a last line without a newline or other line ends
            return self._counted[0] < 1 << 20 and len(self.lines()) >= n

        try:
            wait_until(enough, timeout, f"{n} lines of output")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; got {self.stdout[-4000:]!r}") from None
        return self.lines()

    def wait(self, timeout: float = 15.0) -> int:
        return self.popen.wait(timeout)

    def signal(self, sig: int) -> None:
        if self.popen.poll() is None:
            os.killpg(self.popen.pid, sig)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        self.popen.wait(5)

    def close(self) -> None:
        self._out.close()
        self._err.close()


class Procs:
    """Every process one test started; :meth:`kill_all` ends them."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.started: list[Proc] = []

    def start(
        self,
        argv: Sequence[str],
        *,
        stdin: Any = subprocess.DEVNULL,
        env: dict[str, str] | None = None,
        prefix: Sequence[str] = (),
    ) -> Proc:
        proc = Proc(argv, self.workdir, len(self.started), stdin, env, prefix)
        self.started.append(proc)
        return proc

    def eda(self, program: str, *args: str, **kw: Any) -> Proc:
        return self.start(command(program, *args), **kw)

    def sub_ready(self, *args: str, **kw: Any) -> Proc:
        """Start eda-sub -v and wait until mDNS announced it (publishers can find it)."""
        proc = self.eda("eda-sub", "-v", *args, **kw)
        proc.wait_stderr("announced as")
        return proc

    def kill_all(self) -> None:
        for proc in self.started:
            try:
                proc.signal(signal.SIGKILL)
                proc.popen.wait(5)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
            proc.close()


def run(
    program: str,
    *args: str,
    input: bytes | str | None = None,
    timeout: float = 2 * SAYS_WITHIN,
    env: dict[str, str] | None = None,
    prefix: Sequence[str] = (),
) -> subprocess.CompletedProcess[str]:
    """Run an eda program to completion; stdout and stderr as text.  *timeout* is
    for a command that hangs: a loaded 2-core box ran a refused ``eda-registry list
    --secure`` (0.3 s of CPU) in 9 s with four at once, and one went past 30 s in CI."""
    data = input.encode() if isinstance(input, str) else input
    result = subprocess.run(
        [*prefix, *command(program, *args)],
        input=data,
        capture_output=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        stdin=None if data is not None else subprocess.DEVNULL,
        check=False,
    )
    return subprocess.CompletedProcess(
        result.args,
        result.returncode,
        result.stdout.decode(errors="replace"),
        result.stderr.decode(errors="replace"),
    )


def together(*calls: Callable[[], Any]) -> list[Any]:
    """Run *calls* (independent one-shot commands, e.g. ``lambda: run(...)``) at the same
    time; their results in order.  For checks that do not depend on one another: each
    process waits on its own answers, so N of them take about as long as the slowest.
    An exception of one is raised once all have ended."""
    results: list[Any] = [None] * len(calls)
    errors: list[BaseException] = []

    def one(k: int) -> None:
        try:
            results[k] = calls[k]()
        except BaseException as exc:  # re-raised in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(k,), daemon=True) for k in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return results


_held: list[socket.socket] = []


def closed_port() -> int:
    """A TCP port on 127.0.0.1 where a connect is refused, and stays refused.

    The socket is bound but never listens, and is held until the process
    ends, so no other program can take the port in the meantime.
    """
    sock = socket.socket()
    sock.bind(("0.0.0.0", 0))
    _held.append(sock)
    return int(sock.getsockname()[1])


# -- a scriptable mDNS responder: forged and hostile peers --------------------------------
def dns_rr(name: str, rtype: int, rdata: bytes, ttl: int = 120) -> bytes:
    """One resource record in wire format (class IN)."""
    from eda.core.mdns import encode_name

    return encode_name(name) + struct.pack("!HHIH", rtype, 1, ttl, len(rdata)) + rdata


def dns_response(qid: int, records: Sequence[bytes], answers: int | None = None) -> bytes:
    """A response packet: the first *answers* records (default all) are answers."""
    an = len(records) if answers is None else answers
    head = struct.pack("!HHHHHH", qid, 0x8400, 0, an, 0, len(records) - an)
    return head + b"".join(records)


def service_records(
    service_type: str, label: str, port: int, txt: dict[str, str], address: str
) -> list[bytes]:
    """PTR, SRV, TXT and A records of one DNS-SD instance."""
    from eda.core.mdns import TYPE_A, TYPE_PTR, TYPE_SRV, TYPE_TXT, encode_name

    stype = service_type.rstrip(".")
    inst = f"{label}.{stype}"
    host = f"{label}-host.local"
    strings = [f"{k}={v}".encode() for k, v in txt.items()]
    return [
        dns_rr(stype, TYPE_PTR, encode_name(inst)),
        dns_rr(inst, TYPE_SRV, struct.pack("!HHH", 0, 0, port) + encode_name(host)),
        dns_rr(inst, TYPE_TXT, b"".join(bytes([len(s)]) + s for s in strings)),
        dns_rr(host, TYPE_A, socket.inet_aton(address)),
    ]


def mdns_socket(interface: str = "127.0.0.1") -> socket.socket:
    """A UDP socket on port 5353 in the mDNS group, sharing the port with real responders."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("", 5353))
    group = socket.inet_aton("224.0.0.251") + socket.inet_aton(interface)
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, group)
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(interface))
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 1)
    return sock


class MdnsResponder:
    """Answers one-shot PTR queries with whatever :meth:`answer` returns (a forged peer).

    *answer(qid, qname)* returns (packet, reply-from-mDNS-port) pairs; the
    default answers every question for a type added with :meth:`add`.
    """

    def __init__(self, interface: str = "127.0.0.1") -> None:
        self.sock = mdns_socket(interface)
        self.other = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # a port that is not 5353
        self.records: dict[str, list[bytes]] = {}
        self.answer: Callable[[int, str], list[tuple[bytes, bool]]] = self._answer
        self.queries = 0
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def add(self, service_type: str, records: list[bytes]) -> None:
        self.records.setdefault(service_type.rstrip(".").lower() + ".", []).extend(records)

    def _answer(self, qid: int, qname: str) -> list[tuple[bytes, bool]]:
        records = self.records.get(qname.lower(), [])
        return [(dns_response(qid, records, 1), True)] if records else []

    def _run(self) -> None:
        from eda.core.mdns import DNSFormatError, _read_name

        while not self._stop:
            if not readable([self.sock], 0.05):
                continue
            packet, source = self.sock.recvfrom(9000)
            if len(packet) < 12 or packet[2] & 0x80 or source[1] == 5353:
                continue  # a response, or a full responder's own query
            try:
                qname = _read_name(packet, 12)[0]
            except DNSFormatError:
                continue
            self.queries += 1
            qid = struct.unpack_from("!H", packet)[0]
            for reply, from_mdns_port in self.answer(qid, qname):
                (self.sock if from_mdns_port else self.other).sendto(reply, source)

    def multicast(self, packet: bytes) -> None:
        """Send an unsolicited response (an announcement) to the group, from port 5353."""
        self.sock.sendto(packet, ("224.0.0.251", 5353))

    def close(self) -> None:
        self._stop = True
        self._thread.join(5)
        self.sock.close()
        self.other.close()


# -- secure mode ----------------------------------------------------------------------
class Identity:
    """One secure identity: a configuration home of its own (key pair, trusted directory),
    as on a host of its own."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.env = {"XDG_CONFIG_HOME": str(home), "XDG_CACHE_HOME": str(home / "cache")}
        self.public = keys.create_identity(home / "eda" / "keys" / "id.key").public_text
        self.trusted = home / "eda" / "keys" / "trusted"
        self.trusted.mkdir(parents=True, exist_ok=True)

    def trust(self, name: str, other: Identity) -> None:
        keys.trust(self.trusted, name, other.public)

    def revoke(self, name: str) -> None:
        keys.revoke(self.trusted, name)


def trusting(home: Path, names: Sequence[str]) -> dict[str, Identity]:
    """Identities under *home*: *names* trust one another; ``mallory`` (added) trusts
    them all and nobody trusts mallory (the secure-mode tests' cast)."""
    people = {name: Identity(home / name) for name in (*names, "mallory")}
    for a in names:
        for b in names:
            if a != b:
                people[a].trust(b, people[b])
        people["mallory"].trust(a, people[a])
    return people


class Capture:
    """Every packet on the namespace's loopback, read by an AF_PACKET socket."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
        self.sock.bind(("lo", 0))
        self.sock.settimeout(0.1)
        self.data = bytearray()
        self.running = True
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while self.running:
            try:
                self.data += self.sock.recv(65535)
            except TimeoutError:
                continue

    def stop(self) -> bytes:
        self.running = False
        self.thread.join(5)
        self.sock.close()
        return bytes(self.data)


def half_handshakes(endpoints: Sequence[str]) -> list[socket.socket]:
    """Hostile connections to each ``tcp://HOST:PORT`` of *endpoints*, held open: garbage,
    a ZMTP greeting asking for CURVE and no HELLO, a broken HELLO (the caller closes them)."""
    greeting = b"\xff" + b"\x00" * 8 + b"\x7f" + b"\x03\x00" + b"CURVE".ljust(20, b"\x00")
    greeting += b"\x00" * 32
    held = []
    for where in endpoints:
        host, port = where.removeprefix("tcp://").rsplit(":", 1)
        for payload in (b"garbage" * 100, greeting, greeting + b"\x04\xff" + b"\x00" * 300):
            conn = socket.create_connection((host, int(port)))
            conn.sendall(payload)
            held.append(conn)
    return held
