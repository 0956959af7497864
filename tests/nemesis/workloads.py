"""Workloads: real eda programs as users run them, each operation recorded in the history.

Each workload starts its daemons on the hosts it is given (the nemesis may
kill, restart or freeze them), runs client loops in threads while the
nemesis works, and after the heal and the recovery window makes its final
reads. Values are unique strings, so a checker can tell every event apart.
"""

from __future__ import annotations

import itertools
import json
import re
import signal
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.helpers import PROGRAMS, Proc, wait_until
from tests.hosts import Host
from tests.natsnodes import front, start_nodes
from tests.nemesis.history import FAIL, INFO, OK, History
from tests.nemesis.nemesis import Daemon

BUS_TOPIC, PS_TOPIC, SERVICE, LB_SERVICE = "nem.bus", "nem.ps", "nem", "nemlb"


def json_lines(text: str) -> list[dict[str, Any]]:
    """The complete JSON lines of *text*: a line a kill -9 cut short is no event written."""
    found = []
    for line in text.splitlines():
        try:
            item = json.loads(line)
        except ValueError:
            continue
        if isinstance(item, dict):
            found.append(item)
    return found


def attempt(host: Host, program: str, *args: str, timeout: float) -> tuple[int, str, str]:
    """Run an eda program on *host*: (status, stdout, stderr); status -1 when it did not
    end within *timeout* s (a client the harness gave up on, never a hang of the run)."""
    try:
        r = host.run(program, *args, timeout=timeout)
    except subprocess.TimeoutExpired:
        return -1, "", f"{program} did not end within {timeout:.0f} s"
    return r.returncode, r.stdout, r.stderr


def last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


class Loop:
    """A client that repeats *op* in a thread of its own until stopped."""

    def __init__(
        self, history: History, name: str, op: Callable[[], None], pause: float = 0.1
    ) -> None:
        self.history = history
        self.name = name
        self.op = op
        self.pause = pause
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True, name=name)

    def _run(self) -> None:
        while not self.stopped.is_set():
            try:
                self.op()
            except Exception as exc:  # the harness's own trouble: recorded, and the loop ends
                self.history.add(self.name, "harness", "error", repr(exc), FAIL)
                return
            self.stopped.wait(self.pause)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join(120)


class Workload:
    subject = ""

    def __init__(self, history: History, workdir: Path) -> None:
        self.history = history
        self.workdir = workdir
        self.daemons: list[Daemon] = []
        self.loops: list[Loop] = []

    def daemon(self, name: str, host: Host, proc: Proc, kinds: tuple[str, ...]) -> Daemon:
        d = Daemon(name, host, proc, kinds)
        self.daemons.append(d)
        return d

    def ready(self) -> None:
        """Wait until the daemons started in the constructor serve (all workloads start
        theirs first, then wait: their start-ups overlap)."""

    def recovered(self, healed: float) -> bool:
        """Whether what the checkers judge after the heal (at *healed*) holds already:
        the recovery window ends once every workload's does."""
        return True

    def start(self) -> None:
        for loop in self.loops:
            loop.start()

    def stop_clients(self) -> None:
        """Stop the client loops, each after the operation it is in."""
        for loop in self.loops:
            loop.stopped.set()
        for loop in self.loops:
            loop.stop()

    def finish(self) -> None:
        """Final reads, after the heal and the recovery window."""


# -- the bus (embedded engine) ------------------------------------------------------------
class BusWorkload(Workload):
    """eda-bus serve; confirmed publishers; a durable consumer; a group of two members."""

    subject = "bus"

    def __init__(
        self,
        history: History,
        workdir: Path,
        bus_host: Host,
        publishers: list[Host],
        durable: Host,
        members: list[Host],
    ) -> None:
        super().__init__(history, workdir)
        endpoint = f"tcp://{bus_host.address}:5570"
        bus = bus_host.eda(
            "eda-bus", "serve", "--data", str(workdir / "bus"), "--bind", endpoint, "-v"
        )
        self.fronts = [self.daemon("bus", bus_host, bus, ("kill", "stop"))]
        self.clients([endpoint], publishers, durable, members)

    def clients(
        self, endpoints: list[str], publishers: list[Host], durable: Host, members: list[Host]
    ) -> None:
        """The durable consumer and the group's members (through the first of *endpoints*,
        the bus or its fronts) and the publishers (the i-th through the i-th, in turn)."""
        self.endpoints = endpoints
        sub = ("eda-sub", "--bus", endpoints[0], BUS_TOPIC)
        self.durable = self.daemon(
            "durable" if self.subject == "bus" else f"{self.subject}-durable",
            durable, durable.eda(*sub, "--durable", "d1"), ("kill", "stop"),
        )  # fmt: skip
        self.members = [
            self.daemon(f"member{i}", h, h.eda(*sub, "--group", "g1"), ("kill", "stop"))
            for i, h in enumerate(members, 1)
        ]
        consumers = ["durable", *(["group"] if members else [])]
        self.history.add(self.subject, self.subject, "setup", {"consumers": consumers})
        for i, host in enumerate(publishers, 1):
            name = f"{self.subject}-pub{i}"
            endpoint = endpoints[(i - 1) % len(endpoints)]
            self.loops.append(Loop(self.history, name, self._publisher(name, host, endpoint)))

    def ready(self) -> None:
        self.fronts[0].proc.wait_stderr("announced bus", 60)
        wait_until(lambda: self._stats(self.fronts[0].host) is not None, 60, "the bus's stats")

    def _publisher(self, name: str, host: Host, endpoint: str) -> Callable[[], None]:
        count = iter(range(1, 1 << 30))

        def publish() -> None:
            n = next(count)
            values = [f"{name}-{n}-{i}" for i in range(3)]
            began = self.history.now()
            rc, _, err = attempt(
                host, "eda-pub", "--bus", endpoint, "--confirm", "--timeout", "5",
                BUS_TOPIC, *values, timeout=60,
            )  # fmt: skip
            why = last_line(err)
            outcome = OK if rc == 0 else INFO  # not confirmed: may or may not be stored
            value = {"values": values, "rc": rc, "stderr": why}
            self.history.add(name, self.subject, "publish", value, outcome, began)

        return publish

    def _stats(self, host: Host, endpoint: str | None = None) -> dict[str, Any] | None:
        rc, out, _ = attempt(host, "eda-bus", "stats", "--consumers", "--bus",
                             endpoint or self.endpoints[0], timeout=60)  # fmt: skip
        return {c["name"]: c for c in json_lines(out)} if rc == 0 else None

    def finish(self) -> None:
        host = self.fronts[-1].host  # the last front (the bus itself, or a NATS front)
        endpoint = self.endpoints[-1]
        names = ["d1", *(["g1"] if self.members else [])]
        began = self.history.now()

        def caught_up() -> dict[str, Any] | None:
            stats = self._stats(host, endpoint)
            done = stats and all(stats.get(n, {}).get("lag", 1) == 0 for n in names)
            return stats if done else None

        check = f"{self.subject}-check"
        try:
            stats = wait_until(caught_up, 120, "the durable consumer and the group caught up")
            self.history.add(check, self.subject, "stats", stats, OK, began)
        except AssertionError as exc:
            self.history.add(check, self.subject, "stats", str(exc), FAIL, began)
        began = self.history.now()
        rc, text, _ = attempt(
            host, "eda-sub", "--bus", endpoint, BUS_TOPIC, "--from-start", "--until-end",
            timeout=300,
        )  # fmt: skip
        log = [[e.get("data"), e.get("edabusseq")] for e in json_lines(text)]
        outcome = OK if rc == 0 else FAIL
        self.history.add(check, self.subject, "read", log, outcome, began)
        for d in [self.durable, *self.members]:
            d.proc.signal(signal.SIGTERM)
        for d in [self.durable, *self.members]:
            _ended(d.proc)
            for i, proc in enumerate(d.incarnations):
                events = [[e.get("data"), e.get("edabusseq")] for e in json_lines(proc.stdout)]
                consumer = "durable" if d is self.durable else "group"
                value = {"consumer": consumer, "incarnation": i, "events": events}
                self.history.add(d.name, self.subject, "delivered", value)


# -- the bus on the NATS engine --------------------------------------------------------------
class NatsWorkload(BusWorkload):
    """Three ``nats-server -js`` nodes (an R3 stream), two ``eda-bus serve --engine nats``
    fronts, confirmed publishers and a durable consumer through the fronts: the bus's
    workload and checker (subject ``nats``) on JetStream. The nemesis kills, freezes and
    cuts off nodes and fronts alike."""

    subject = "nats"

    def __init__(
        self,
        history: History,
        workdir: Path,
        nodes: list[Host],
        fronts: list[Host],
        publishers: list[Host],
        durable: Host,
    ) -> None:
        Workload.__init__(self, history, workdir)
        self.urls = start_nodes(nodes, workdir / "nats", wait=False)
        for i, host in enumerate(nodes, 1):
            self.daemon(f"nats{i}", host, host.started[-1], ("kill", "stop"))
        self.front_hosts, self.fronts = fronts, []
        self.publishers, self.durable_host = publishers, durable
        self.loops = []

    def ready(self) -> None:
        """The nodes ready, then the fronts (each started again until JetStream has a
        meta leader), then the durable consumer and the publishers."""
        for d in self.daemons:
            d.proc.wait_stderr("Server is ready", 60)
        engine = ",".join(self.urls)
        endpoints = []
        for i, host in enumerate(self.front_hosts, 1):
            endpoint = f"tcp://{host.address}:5571"
            proc, _ = front(host, engine, "--no-mdns", "--bind", endpoint)
            self.fronts.append(self.daemon(f"front{i}", host, proc, ("kill", "stop")))
            endpoints.append(endpoint)
        self.clients(endpoints, self.publishers, self.durable_host, [])

    def recovered(self, healed: float) -> bool:
        """Each front serves again: one that exited (started while JetStream had no
        leader, as after a kill -9 during a partition) is started again, as a
        supervisor would."""
        for d in self.fronts:
            if d.proc.popen.poll() is not None:
                d.restart()
                self.history.add(d.name, self.subject, "restart", None, INFO)
        return all(self._stats(d.host, e) is not None for d, e in zip(
            self.fronts, self.endpoints, strict=True))  # fmt: skip


def _ended(proc: Proc, timeout: float = 30) -> None:
    try:
        proc.popen.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()


# -- brokerless pub/sub -------------------------------------------------------------------
SUB_ID = re.compile(r"announced as (\w+) on mDNS")
SUB_LOST = re.compile(r"lost (\d+) events from")
PUB_REPORT = re.compile(r"subscriber (\w+) (is gone|lost (\d+) event|did not confirm)")


class PubSubWorkload(Workload):
    """One brokerless feed (eda-pub reading a pipe) and subscribers on other hosts."""

    subject = "pubsub"

    def __init__(
        self, history: History, workdir: Path, feed_host: Host, subscribers: list[Host]
    ) -> None:
        super().__init__(history, workdir)
        self.subs = []
        for i, host in enumerate(subscribers, 1):
            proc = host.eda("eda-sub", "-v", PS_TOPIC)
            self.subs.append(self.daemon(f"ps-sub{i}", host, proc, ("kill", "stop")))
        self.feed_host = feed_host
        self.count = 0
        self.loops.append(Loop(self.history, "feed", self._write, pause=0.05))

    def ready(self) -> None:
        """The subscribers announced, then the feed started (it finds them)."""
        for d in self.subs:
            d.proc.wait_stderr("announced as", 60)
        feed = self.feed_host.eda("eda-pub", "-v", PS_TOPIC, stdin=subprocess.PIPE)
        # frozen, not killed: a new feed would be a new publisher, its events a new stream
        self.feed = self.daemon("feed", self.feed_host, feed, ("stop",))
        self.pipe = feed.popen.stdin

    def _write(self) -> None:
        assert self.pipe is not None
        self.count += 1
        began = self.history.now()
        self.pipe.write(f"p-{self.count}\n".encode())
        self.pipe.flush()
        self.history.add("feed", self.subject, "publish", self.count, OK, began)

    def finish(self) -> None:
        assert self.pipe is not None
        self.pipe.close()
        feed = self.feed.proc
        began = self.history.now()
        _ended(feed, 60)
        reports: dict[str, list[str]] = {}
        for m in PUB_REPORT.finditer(feed.stderr):
            reports.setdefault(m.group(1), []).append(m.group(2))
        value = {"rc": feed.popen.returncode, "last": self.count, "reports": reports}
        self.history.add("feed", self.subject, "feed-end", value, OK, began)
        for d in self.subs:
            d.proc.signal(signal.SIGTERM)
        for d in self.subs:
            _ended(d.proc)
            for i, proc in enumerate(d.incarnations):
                sid = SUB_ID.search(proc.stderr)
                events = [[e.get("edaseq"), e.get("data")] for e in json_lines(proc.stdout)]
                value = {
                    "incarnation": i,
                    "id": sid.group(1) if sid else None,
                    "events": events,
                    "lost": sum(int(n) for n in SUB_LOST.findall(proc.stderr)),
                }
                self.history.add(d.name, self.subject, "delivered", value)


# -- the registry -------------------------------------------------------------------------
# eda's default TTL and a 3 s peer timeout: on a loaded machine a starved registrant
# misses a 2 s TTL with no fault at all (seed 4: views flapped after the heal)
TTL, INTERVAL, PEER_TIMEOUT, TICK = 6.0, 1.0, 3.0, 0.2
DNS_PORT = 8600


class RegistryWorkload(Workload):
    """Three registry peers, a registrant per host, and each peer's view looked up.

    Each peer is asked two ways from its own host (so a partition never hides
    its view): ``eda-registry lookup`` (a whole program run, seconds on a
    loaded machine) and ``dig`` at its DNS interface (milliseconds), which
    times convergence finely."""

    subject = "registry"

    def __init__(
        self,
        history: History,
        workdir: Path,
        peers: list[Host],
        registrants: list[Host],
        rotate_lookups: bool = False,
    ) -> None:
        """*rotate_lookups*: one ``eda-registry lookup`` loop asks the peers in turn
        (the short form: a program run costs a loaded machine seconds) instead of one
        loop per peer; ``dig`` always asks each peer in a loop of its own."""
        super().__init__(history, workdir)
        endpoints = [f"tcp://{h.address}:7700" for h in peers]
        self.peers = peers
        for i, host in enumerate(peers):
            others = [a for e in endpoints if e != endpoints[i] for a in ("--peer", e)]
            proc = host.eda(
                "eda-registry", "serve", "-v", "--data", str(workdir / f"registry{i + 1}"),
                "--tick", str(TICK), "--peer-timeout", str(PEER_TIMEOUT), *others,
                "--dns", f"{host.address}:{DNS_PORT}",
            )  # fmt: skip
            self.daemon(f"registry{i + 1}", host, proc, ("kill", "stop"))
        history.add(
            "registry", self.subject, "setup",
            {"ttl": TTL, "peer_timeout": PEER_TIMEOUT, "tick": TICK, "interval": INTERVAL},
        )  # fmt: skip
        self.registrants = registrants
        self.instances: list[str] = []
        observers = []
        for i, (host, endpoint) in enumerate(zip(peers, endpoints, strict=True), 1):
            observers.append(self._observer(f"observer{i}", i, host, endpoint))
            self.loops.append(
                Loop(self.history, f"dig{i}", self._dig(f"dig{i}", i, host), pause=0.1)
            )
        if rotate_lookups:
            turn = itertools.cycle(observers)
            self.loops.append(Loop(self.history, "observers", lambda: next(turn)(), pause=0.2))
        else:
            for i, observer in enumerate(observers, 1):
                self.loops.append(Loop(self.history, f"observer{i}", observer, pause=0.2))

    def ready(self) -> None:
        """The peers announced, then a registrant per host registered (it finds them)."""
        for d in list(self.daemons):
            d.proc.wait_stderr("announced registry", 60)
        started = []
        for i, host in enumerate(self.registrants, 1):
            port = 9000 + i
            proc = host.eda(
                "eda-registry", "register", "-v", SERVICE, "--port", str(port), "--ttl", str(TTL),
                "--interval", str(INTERVAL), "--id", f"svc{i}",
            )  # fmt: skip
            started.append(self.daemon(f"svc{i}", host, proc, ("kill", "stop")))
        for d in started:
            d.proc.wait_stderr(f"registered {SERVICE}/", 60)
            self.instances.append(d.name)
            self.history.add(d.name, self.subject, "instance", {"daemon": d.name, "id": d.name})

    def recovered(self, healed: float) -> bool:
        """Every peer's last view since *healed*, asked with dig (milliseconds, where a
        lookup is a whole program run), is every instance: the checker's convergence."""
        expected = sorted(self.instances)
        last: dict[int, Any] = {}
        for op in list(self.history.ops):
            if op.subject == self.subject and op.kind == "view" and op.time >= healed:
                last[op.value["registry"]] = op
        return len(last) == len(self.peers) and all(
            op.outcome == OK and op.value["ids"] == expected for op in last.values()
        )

    def _dig(self, name: str, peer: int, host: Host) -> Callable[[], None]:
        argv = [
            *host.prefix, "dig", "+short", "+time=1", "+tries=1", "-p", str(DNS_PORT),
            f"@{host.address}", f"{SERVICE}.service.eda", "SRV",
        ]  # fmt: skip

        def view() -> None:
            began = self.history.now()
            try:
                r = subprocess.run(argv, capture_output=True, text=True, timeout=10)
                rc = r.returncode
            except subprocess.TimeoutExpired:
                rc = -1
            if rc == 0:  # "PRIO WEIGHT PORT ID.nem.service.eda." per instance
                ids = sorted(line.split()[3].split(".")[0] for line in r.stdout.splitlines())
                value: Any = {"registry": peer, "ids": ids}
                self.history.add(name, self.subject, "view", value, OK, began)
            else:
                value = {"registry": peer, "rc": rc}
                self.history.add(name, self.subject, "view", value, FAIL, began)

        return view

    def _observer(self, name: str, peer: int, host: Host, endpoint: str) -> Callable[[], None]:
        def lookup() -> None:
            began = self.history.now()
            rc, out, _ = attempt(
                host, "eda-registry", "lookup", SERVICE, "--registry", endpoint, timeout=30
            )
            if rc in (0, 3):  # 3: none passing, an empty view
                ids = sorted(str(item.get("id")) for item in json_lines(out))
                value: Any = {"registry": peer, "ids": ids}
                self.history.add(name, self.subject, "lookup", value, OK, began)
            else:
                value = {"registry": peer, "rc": rc}
                self.history.add(name, self.subject, "lookup", value, FAIL, began)

        return lookup


# -- eda-lb ---------------------------------------------------------------------------------
PROGRAMS.setdefault("eda-lb", "eda.cli.lb")
LB_FAILED = re.compile(r"request (\d+) failed")
LB_UNSENT = re.compile(r"input from line (\d+) on not sent")
LB_SENT = re.compile(r"request (\d+) sent to tcp://(.+):\d+$", re.M)  # eda-lb call -v


class LbWorkload(Workload):
    """Workers of one service on several hosts (each reply names its worker); callers
    send numbered requests with ``eda-lb call -v`` and keep its stdout, stderr (where
    each attempt's instance is named) and status."""

    subject = "lb"

    def __init__(
        self, history: History, workdir: Path, workers: list[Host], callers: list[Host]
    ) -> None:
        super().__init__(history, workdir)
        self.names = []
        where = {}
        for i, host in enumerate(workers, 1):
            name = f"lbw{i}"
            reply = f'printf "%s %s\\n" "$(cat)" {name}'
            proc = host.eda(
                "eda-lb", "worker", LB_SERVICE, "-v", "--heartbeat", "0.3", "--id", name,
                "--", "sh", "-c", reply,
            )  # fmt: skip
            self.daemon(name, host, proc, ("kill", "stop"))
            self.names.append(name)
            where[name] = host.address
        history.add("lb", self.subject, "setup", {"workers": self.names, "hosts": where})
        for i, host in enumerate(callers, 1):
            self.loops.append(Loop(self.history, f"lb-call{i}", self._caller(f"lb-call{i}", host)))

    def ready(self) -> None:
        for d in self.daemons:
            d.proc.wait_stderr(f"serving {LB_SERVICE} on", 60)

    def _caller(self, name: str, host: Host) -> Callable[[], None]:
        count = iter(range(1, 1 << 30))

        def call() -> None:
            n = next(count)
            requests = [f"{name}-{n}-{i}" for i in range(5)]
            began = self.history.now()
            rc, out, err = attempt(
                host, "eda-lb", "call", "-v", LB_SERVICE, "--timeout", "8", *requests,
                timeout=120,
            )  # fmt: skip
            unsent = LB_UNSENT.search(err)
            sent: dict[str, list[str]] = {}
            for m in LB_SENT.finditer(err):
                sent.setdefault(m.group(1), []).append(m.group(2).strip("[]"))
            value = {
                "requests": requests,
                "replies": out.splitlines(),
                "failed": sorted(int(m) for m in LB_FAILED.findall(err)),
                "unsent_from": int(unsent.group(1)) if unsent else None,
                "sent": sent,  # request number -> the hosts of the instances it went to
                "rc": rc,
                "stderr": last_line(LB_SENT.sub("", err)),
            }
            self.history.add(name, self.subject, "call", value, OK if rc == 0 else FAIL, began)

        return call
