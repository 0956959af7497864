"""What a saga step does: run a shell command, publish an event, call a service.

Each runner takes an :class:`~.sagafile.Action` and an :class:`Invocation`
(who is asking: saga id, step, attempt, phase; the saga data; the directory)
and returns a :class:`Result`: ok or not, the JSON object to merge into the
saga data, the error of a failed try.  A runner never raises for a failed
try; an exception means the try could not be made at all (the executor then
stops as after a crash, and a resume tries again).
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .. import security
from ..endpoint import Endpoint
from ..errors import UsageError
from ..runner import run, shell, signal_group
from .sagaplan import Action, Plan

MAX_OUTPUT = 256 << 10  # a step's stdout above this is not merged into the data


@dataclass(frozen=True)
class Invocation:
    """One try of one action: who it is, and the data it gets."""

    saga_id: str
    step: str
    attempt: int
    phase: str  # "action" or "compensate"
    data: bytes  # the saga data, JSON, newline-terminated
    cwd: str

    def env(self) -> dict[str, str]:
        return {
            "EDA_SAGA_ID": self.saga_id,
            "EDA_STEP": self.step,
            "EDA_ATTEMPT": str(self.attempt),
            "EDA_SAGA_PHASE": self.phase,
        }


@dataclass
class Result:
    ok: bool
    output: dict[str, Any] | None = None  # a JSON object to merge into the data
    error: str = ""
    note: str = ""


Runner = Callable[[Action, Invocation], Result]


def _json_object(raw: bytes) -> tuple[dict[str, Any] | None, str]:
    """The JSON object *raw* holds -- all of it, or else its last line (after lines
    of other text) -- or None, and, if it looked like an object but is not
    used, why."""
    text = raw.strip()
    if not text.startswith(b"{"):
        last = text.rsplit(b"\n", 1)[-1].strip()
        if last is text or not last.startswith(b"{"):
            return None, ""
        text = last
    if len(text) > MAX_OUTPUT:
        return None, f"output of {len(text)} bytes is over {MAX_OUTPUT}: not merged"

    def refuse(name: str) -> Any:
        raise ValueError(f"{name} is not JSON")

    try:
        value = json.loads(text, parse_constant=refuse)
    except (ValueError, RecursionError, UnicodeDecodeError) as exc:
        return None, f"output is not valid JSON ({str(exc)[:80]}): not merged"
    if not isinstance(value, dict):
        return None, ""
    return value, ""


class Children:
    """The process groups of running shell actions, to kill on a timeout or an interrupt."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pids: set[int] = set()
        self._closed = False

    def add(self, pid: int) -> None:
        """Track *pid*'s group; after :meth:`kill_all`, kill it at once."""
        with self._lock:
            if not self._closed:
                self._pids.add(pid)
                return
        signal_group(pid, signal.SIGKILL)

    def discard(self, pid: int) -> None:
        with self._lock:
            self._pids.discard(pid)

    def kill_all(self) -> None:
        """Kill every tracked group, and any added from now on."""
        with self._lock:
            self._closed = True
            pids = list(self._pids)
        for pid in pids:
            signal_group(pid, signal.SIGKILL)


def run_shell(
    command: str,
    inv: Invocation,
    timeout: float | None,
    *,
    children: Children | None = None,
    on_stderr: Callable[[bytes], None] | None = None,
    on_spawn: Callable[[], None] | None = None,
) -> Result:
    """``sh -c COMMAND`` with the data on stdin; its JSON-object stdout becomes the output
    (a failed try's error follows :mod:`eda.core.runner`'s rule)."""
    env = dict(os.environ)
    env.update(inv.env())

    pid = 0

    def track(group: int) -> None:
        nonlocal pid
        pid = group
        if children is not None:
            children.add(group)
        if on_spawn is not None:  # (the command runs meanwhile)
            on_spawn()

    try:
        outcome = run(
            shell(command), inv.data, timeout=timeout, env=env, cwd=inv.cwd or None,
            max_output=MAX_OUTPUT, on_stderr=on_stderr, on_spawn=track,
        )  # fmt: skip
    finally:
        if children is not None and pid:
            children.discard(pid)
    if not outcome.ok:
        return Result(False, error=outcome.reason())
    if outcome.overflow:
        return Result(True, None, note=f"output over {MAX_OUTPUT} bytes: not merged")
    output, note = _json_object(outcome.stdout)
    return Result(True, output, note=note)


@dataclass(frozen=True)
class Reach:
    """How call and publish actions find their peers (the CLI's discovery options)."""

    interface: str | None = None  # an IPv4 address
    mdns: bool = True
    registries: tuple[str, ...] = ()
    serverless: bool = False


def run_publish(action: Action, inv: Invocation, reach: Reach) -> Result:
    """Publish the saga data as one JSON event on the action's topic (eda pub/sub).

    Subscribers are those found by mDNS (unless *mdns* is off) and the
    action's ``connect`` endpoints; the try fails when one of them does not
    confirm the event within the timeout (default 5 s).  No subscriber at all
    is not a failure (nobody asked for the event); the record notes it.
    The event carries the headers ``sagaid``, ``sagastep`` and ``sagaattempt``.
    """
    from .. import codec, discovery
    from ..pubsub import Publisher

    if not reach.mdns and not action.connect:
        return Result(False, error="publish needs mDNS or connect = [endpoints] (--no-mdns is on)")
    limit = action.timeout or 5.0
    headers = {"sagaid": inv.saga_id, "sagastep": inv.step, "sagaattempt": str(inv.attempt)}
    pub = Publisher(headers=headers, interface=discovery.resolve_interface(reach.interface))
    try:
        started = time.monotonic()
        for endpoint in action.connect:
            pub.connect(endpoint, watch=True)
        expected = pub.connect_subscribers(0.15, action.target) if reach.mdns else set()
        missing = pub.wait_for(expected, len(action.connect), limit * 0.6)  # the rest: finish
        unready = pub.unready()
        body = inv.data.rstrip(b"\n")
        pub.send(action.target, body, 1, codec.JSON)
        outcome = pub.finish(max(0.1, limit - (time.monotonic() - started)))
    finally:
        pub.close(0.5)
    problems = [f"subscriber {s} not ready" for s in sorted(missing)]
    problems += [f"{endpoint} did not answer" for endpoint, _ in unready]
    problems += [f"subscriber {s} lost it" for s in sorted(outcome.lost)]
    problems += [f"subscriber {s} did not confirm it" for s in sorted(outcome.unconfirmed)]
    if problems:
        return Result(False, error="publish: " + "; ".join(problems)[:300])
    if not pub.subscribers and not outcome.gone:
        return Result(True, note="no subscriber was listening")
    return Result(True)


def request_prefix(inv: Invocation) -> bytes:
    """The request id's prefix: the same for every try of one step's action (or
    compensation) in one saga, so a service sees the same ``EDA_REQUEST_ID``
    (the prefix and ``0``) on a retry -- a key to make it idempotent."""
    key = f"{inv.saga_id}.{inv.step}.{inv.phase}."
    if len(key) > 62 or not key.isascii():
        import hashlib

        key = hashlib.sha256(key.encode()).hexdigest()[:40] + "."
    return key.encode()


def _caller() -> Any:
    """eda-lb's Caller class and lookup, or None in a build without them."""
    try:
        from ..lb.caller import Caller, lookup_endpoints
    except ImportError:
        return None
    return Caller, lookup_endpoints


def run_call(action: Action, inv: Invocation, reach: Reach = Reach()) -> Result:
    """One request with the saga data to the eda-lb service *action.target*.

    Its instances are looked up (registry, else mDNS; or the action's
    ``connect`` endpoints) and balanced over by eda-lb's caller, which
    retries a request that times out or whose instance dies once on another
    instance, with the same request id.  The reply is the step's output; an
    error reply, a timeout or no live instance fails the try.
    """
    found = _caller()
    if found is None:
        return Result(False, error=CALL_UNAVAILABLE)
    caller_class, lookup_endpoints = found
    from ..errors import EdaError
    from ..registry.access import Access

    replies: list[bytes] = []
    failures: list[str] = []
    caller = caller_class(
        out=replies.append,
        failed=lambda seq, body, reason: failures.append(reason),
        timeout=action.timeout or 10.0,
        retries=1,
        window=1,
        interface=reach.interface,
    )
    caller.prefix = request_prefix(inv)
    refusals: list[str] = []  # secure mode: workers refusing this key, told as cli/secure.py does

    def refused(endpoint: str, why: str) -> None:
        active = security.active()
        key = active.public_key if active is not None else ""
        refusals.append(f"the worker at {endpoint} {why} (eda-keys show: {key})")

    caller.on_refused = refused
    finder = None
    try:
        if action.connect:
            caller.use([(connect_endpoint(e).zmq, 1) for e in action.connect])
        else:
            access = Access(
                registries=reach.registries,
                interface=reach.interface,
                mdns=reach.mdns,
                serverless=reach.serverless,
            )
            finder, instances = lookup_endpoints(action.target, access)
            caller.use(instances)
        caller.feed([inv.data.rstrip(b"\n")])
        caller.run()
    except EdaError as exc:  # no instance, no registry
        return Result(False, error=f"call {action.target}: {exc}")
    finally:
        if finder is not None:
            finder.close()
        caller.close()
    if refusals or failures:
        return Result(False, error=f"call {action.target}: {(refusals or failures)[0]}"[:300])
    output, note = _json_object(b"".join(replies))
    return Result(True, output, note=note)


CALL_UNAVAILABLE = (
    "call steps need eda-lb's caller (eda.core.lb.caller), which this build does not have yet"
)


def connect_endpoint(text: str) -> Endpoint:
    """A ``connect`` endpoint of a call step: in secure mode ``NAME@tcp://HOST:PORT``,
    the worker's trusted key pinned (eda-lb call --connect's rule); UsageError otherwise."""
    from ..lb.pins import given

    return given(text, "worker", "connect")


def check_runnable(plan: Plan) -> None:
    """Refuse a plan this build cannot run, before any step runs: a call step without
    eda-lb's caller, a ``connect`` endpoint that breaks secure mode's rule."""
    for step in plan.steps:
        for action in (step.action, step.compensate):
            if action is not None and action.kind == "call" and _caller() is None:
                raise UsageError(f"step {step.name!r}: {CALL_UNAVAILABLE}")
            active = security.active()
            for text in action.connect if action is not None else ():
                try:
                    if action is not None and action.kind == "call":
                        connect_endpoint(text)
                    elif active is not None:
                        active.pinned(text, option="connect")
                except UsageError as exc:
                    raise UsageError(f"step {step.name!r}: {exc}") from None
