"""The saga file: a TOML list of ``[[step]]`` tables, loaded into a checked
:class:`~.sagaplan.Plan` (the plan itself, as the executor and the log use it, is in
:mod:`.sagaplan`).

A saga file looks like this (``eda-txn saga init`` writes a commented one)::

    name = "order"                      # optional; shown by status
    timeout = 30                        # optional default per-step timeout, seconds
    retry = { attempts = 3, backoff = 0.5, jitter = 0.5 }   # optional default retry

    [[step]]
    name = "reserve"
    run = "./reserve.sh"                # a shell command (sh -c, in the start directory)
    compensate = "./release.sh"         # shorthand for { run = "./release.sh" }

    [[step]]
    name = "charge"
    call = "payments"                   # a request to an eda-lb service
    compensate = { call = "refunds", timeout = 5 }
    pivot = true                        # the point of no return

    [[step]]
    name = "email"
    group = "notify"                    # consecutive steps of one group run in parallel
    publish = "orders.confirmed"        # the saga data as one event on this topic

Rules (each broken one is an error naming the file, line and key):

- every step has a ``name`` (letters, digits, ``.``, ``_``, ``-``; unique) and
  exactly one action: ``run``, ``call`` or ``publish``;
- ``compensate`` is a string (a shell command) or a table with one action and
  optional ``timeout``, ``retry`` and ``connect``;
- ``timeout`` is seconds (> 0); ``retry`` is a table: ``attempts`` (>= 1, the
  total number of tries), ``backoff`` (seconds before the second try, doubled
  for each further one, at most ``max_backoff``), ``jitter`` (0..1: each delay
  is cut by up to this fraction, at random);
- ``group = "NAME"`` on consecutive steps runs them in parallel; a group name
  cannot come back after another step;
- at most one step has ``pivot = true``; the steps after it are retriable:
  retried until they succeed (``attempts`` does not apply) and never
  compensated, so neither they nor the pivot may have a ``compensate``; the
  pivot is not in a group;
- ``connect`` (a string or list of ``tcp://`` endpoints) sends a ``publish``
  action to those subscribers too (besides those found by mDNS), and a
  ``call`` action to those instances (instead of looking the service up);
  in secure mode (``eda-txn saga --secure``) each names the server's trusted
  key, ``NAME@tcp://HOST:PORT`` (NAME as in ``eda-keys list``).

tomllib gives no positions for keys, so :func:`locate` finds a key's line by
scanning the text: table headers delimit the ``[[step]]`` tables, then the
key's assignment (plain, dotted or quoted) is searched within the table.
"""

from __future__ import annotations

import math
import re
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import UsageError
from .sagaplan import KINDS, Action, Plan, Retry, Step

# an endpoint, in secure mode after the trusted name of its key (core/keys.py's NAME)
CONNECT_RE = re.compile(r"(?:[A-Za-z0-9][A-Za-z0-9_.-]{0,63}@)?(?:tcp|ipc|inproc)://\S+")
STEP_KEYS = {"name", *KINDS, "compensate", "timeout", "retry", "group", "pivot", "connect"}
ACTION_KEYS = {*KINDS, "timeout", "retry", "connect"}
TOP_KEYS = {"name", "timeout", "retry", "step"}
RETRY_KEYS = {"attempts", "backoff", "jitter", "max_backoff"}
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
MAX_STEPS = 1000
MAX_FILE = 1 << 20
MAX_TIMEOUT = 7 * 86400.0  # a week


class SagaFileError(UsageError):
    """A saga file that cannot be used; the message names the file, line and key."""


# -- finding lines ------------------------------------------------------------------------

_HEADER = re.compile(r"\s*\[(\[)?([^\]]*)\]")
_ASSIGN = re.compile(
    r"\s*((?:[A-Za-z0-9_-]+|\"[^\"]*\"|'[^']*')(?:\s*\.\s*(?:[A-Za-z0-9_-]+|\"[^\"]*\"|'[^']*'))*)\s*="
)


def _dotted(text: str) -> list[str]:
    parts = re.findall(r"\"[^\"]*\"|'[^']*'|[^.]+", text)
    return [p.strip().strip("\"'") for p in parts if p.strip()]


def _keyed_lines(text: str) -> list[tuple[list[str | int], int]]:
    """Every table header and key assignment of *text*: (full key path, line number)."""
    found: list[tuple[list[str | int], int]] = []
    table: list[str | int] = []
    steps = -1
    in_string = False
    # (split, not splitlines: "\x85" and friends are no newline in TOML)
    for number, line in enumerate(text.split("\n"), 1):
        quotes = line.count('"""') + line.count("'''")
        if in_string:
            in_string = quotes % 2 == 0
            continue
        header = _HEADER.match(line)
        if header and not line.lstrip().startswith("#"):
            names: list[str | int] = list(_dotted(header.group(2)))
            if names[:1] == ["step"]:
                if header.group(1) and len(names) == 1:
                    steps += 1
                names.insert(1, max(steps, 0))
            table = names
            found.append((table, number))
        else:
            assign = _ASSIGN.match(line)
            if assign:
                found.append(([*table, *_dotted(assign.group(1))], number))
        if quotes % 2 == 1:
            in_string = True
    return found


def locate(text: str, path: Sequence[str | int]) -> int:
    """The line (1-based) where *path* is set: ``("step", 2, "retry", "attempts")`` is
    the ``attempts`` of the third step's ``retry``, whether written as a
    ``[step.retry]`` table, a dotted key or an inline table (then the line of
    ``retry``).  Falls back to the nearest enclosing key or table that is
    written (line 1 at worst)."""
    want = list(path)
    best, best_len = 1, -1
    for keys, number in _keyed_lines(text):
        common = 0
        for a, b in zip(keys, want, strict=False):
            if a != b:
                break
            common += 1
        # a full match wins; else the deepest written ancestor of the path
        if common == len(keys) and common > best_len:
            best, best_len = number, common
            if common == len(want):
                return number
    return best


# -- checking -----------------------------------------------------------------------------


class _Checker:
    def __init__(self, source: str, text: str) -> None:
        self.source = source
        self.text = text
        self.step_names: dict[int, str] = {}  # index -> name, once known to be valid

    def fail(self, path: Sequence[str | int], message: str) -> SagaFileError:
        line = locate(self.text, path)
        where = ""
        if len(path) >= 2 and path[0] == "step" and isinstance(path[1], int):
            name = self.step_names.get(path[1])
            where = f"step {name!r}: " if name else f"[[step]] number {path[1] + 1}: "
            path = path[2:]
        key = ".".join(str(p) for p in path)
        key = "".join(c if c.isprintable() else repr(c)[1:-1] for c in key)  # (a key from the file)
        what = f"key '{key}': " if key else ""
        return SagaFileError(f"{self.source}:{line}: {where}{what}{message}")

    def string(self, value: Any, path: Sequence[str | int], pattern: re.Pattern[str] | None) -> str:
        if not isinstance(value, str) or not value.strip():
            raise self.fail(path, "must be a non-empty string")
        if "\x00" in value:
            raise self.fail(path, "must not hold a NUL character")
        if pattern is not None and not pattern.fullmatch(value):
            raise self.fail(
                path, f"{value!r} is not a valid name (letters, digits, '.', '_', '-'; 1-64)"
            )
        return value

    def number(
        self, value: Any, path: Sequence[str | int], low: float, high: float, *, open_low: bool
    ) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.fail(path, "must be a number")
        number = float(value)
        if (
            not math.isfinite(number)
            or number > high
            or number < low
            or (open_low and number == low)
        ):
            side = ">" if open_low else ">="
            raise self.fail(path, f"must be {side} {low:g} and at most {high:g}")
        return number

    def retry(self, value: Any, path: list[str | int], base: Retry) -> Retry:
        if not isinstance(value, dict):
            raise self.fail(path, "must be a table: { attempts = 3, backoff = 0.5, jitter = 0.5 }")
        for key in value:
            if key not in RETRY_KEYS:
                raise self.fail(
                    [*path, key], f"unknown key; known: {', '.join(sorted(RETRY_KEYS))}"
                )
        attempts = base.attempts
        if "attempts" in value:
            raw = value["attempts"]
            if isinstance(raw, bool) or not isinstance(raw, int) or not 1 <= raw <= 1_000_000:
                raise self.fail([*path, "attempts"], "must be a whole number from 1 to 1000000")
            attempts = raw
        backoff, jitter, most = base.backoff, base.jitter, base.max_backoff
        if "backoff" in value:
            backoff = self.number(value["backoff"], [*path, "backoff"], 0, 3600, open_low=False)
        if "jitter" in value:
            jitter = self.number(value["jitter"], [*path, "jitter"], 0, 1, open_low=False)
        if "max_backoff" in value:
            most = self.number(
                value["max_backoff"], [*path, "max_backoff"], 0, 86400, open_low=True
            )
        return Retry(attempts, backoff, jitter, most)

    def connect(self, value: Any, path: list[str | int]) -> tuple[str, ...]:
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not items:
            raise self.fail(path, "must be an endpoint or a list of them, e.g. 'tcp://host:5555'")
        for i, item in enumerate(items):
            if not isinstance(item, str) or not CONNECT_RE.fullmatch(item):
                raise self.fail([*path, i], f"{item!r} is not an endpoint like 'tcp://host:5555'")
        return tuple(items)

    def action(
        self,
        table: dict[str, Any],
        path: list[str | int],
        allowed: set[str],
        timeout: float | None,
        retry: Retry,
    ) -> Action:
        kinds = [k for k in KINDS if k in table]
        if not kinds:
            raise self.fail(
                path, "needs an action: run = 'command', call = 'service' or publish = 'topic'"
            )
        if len(kinds) > 1:
            raise self.fail(
                [*path, kinds[1]], f"has both {kinds[0]} and {kinds[1]}: one action per step"
            )
        for key in table:
            if key not in allowed:
                raise self.fail([*path, key], f"unknown key; known: {', '.join(sorted(allowed))}")
        kind = kinds[0]
        target = self.string(table[kind], [*path, kind], None)
        if kind == "publish":
            from ..topics import validate_topic

            try:
                validate_topic(target)
            except Exception as exc:
                raise self.fail([*path, kind], str(exc)) from None
        if kind == "call" and not NAME.fullmatch(target):
            raise self.fail([*path, kind], f"{target!r} is not a service name")
        if "timeout" in table:
            timeout = self.number(
                table["timeout"], [*path, "timeout"], 0, MAX_TIMEOUT, open_low=True
            )
        if "retry" in table:
            retry = self.retry(table["retry"], [*path, "retry"], retry)
        connect: tuple[str, ...] = ()
        if "connect" in table:
            if kind == "run":
                raise self.fail([*path, "connect"], "only publish and call actions connect")
            connect = self.connect(table["connect"], [*path, "connect"])
        return Action(kind, target, timeout, retry, connect)


def parse(text: str, source: str = "<saga>") -> Plan:
    """Check the TOML *text* of a saga file and return its plan (or raise SagaFileError)."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SagaFileError(f"{source}: invalid TOML: {exc}") from None
    check = _Checker(source, text)
    for key in doc:
        if key not in TOP_KEYS:
            raise check.fail([key], f"unknown key; known: {', '.join(sorted(TOP_KEYS))}, [[step]]")
    name = check.string(doc["name"], ["name"], NAME) if "name" in doc else Path(source).stem
    if not NAME.fullmatch(name):
        name = "saga"
    timeout: float | None = None
    if "timeout" in doc:
        timeout = check.number(doc["timeout"], ["timeout"], 0, MAX_TIMEOUT, open_low=True)
    retry = check.retry(doc["retry"], ["retry"], Retry()) if "retry" in doc else Retry()
    raw_steps = doc.get("step")
    if not isinstance(raw_steps, list) or not raw_steps:
        raise check.fail(["step"], "a saga needs at least one [[step]] table")
    if len(raw_steps) > MAX_STEPS:
        raise check.fail(["step"], f"more than {MAX_STEPS} steps")
    steps: list[Step] = []
    names: set[str] = set()
    groups_done: set[str] = set()
    pivot_at: int | None = None
    for index, table in enumerate(raw_steps):
        path: list[str | int] = ["step", index]
        if not isinstance(table, dict):
            raise check.fail(path, "must be a table")
        if "name" not in table:
            raise check.fail(path, "a step needs a name")
        name_ = check.string(table["name"], [*path, "name"], NAME)
        if name_ in names:
            raise check.fail([*path, "name"], f"step name {name_!r} is used twice")
        names.add(name_)
        check.step_names[index] = name_
        for key in table:
            if key not in STEP_KEYS:
                raise check.fail(
                    [*path, key], f"unknown key; known: {', '.join(sorted(STEP_KEYS))}"
                )
        action = check.action(
            {k: v for k, v in table.items() if k not in STEP_KEYS - ACTION_KEYS},
            path,
            ACTION_KEYS,
            timeout,
            retry,
        )
        step_timeout = action.timeout
        step_retry = action.retry
        compensate: Action | None = None
        if "compensate" in table:
            raw = table["compensate"]
            cpath: list[str | int] = [*path, "compensate"]
            if isinstance(raw, str):
                compensate = check.action(
                    {"run": raw}, cpath, ACTION_KEYS, step_timeout, step_retry
                )
            elif isinstance(raw, dict):
                compensate = check.action(raw, cpath, ACTION_KEYS, step_timeout, step_retry)
            else:
                raise check.fail(cpath, "must be a shell command or a table like { call = 'svc' }")
        group: str | None = None
        if "group" in table:
            group = check.string(table["group"], [*path, "group"], NAME)
            previous = steps[-1].group if steps else None
            if group != previous and group in groups_done:
                raise check.fail([*path, "group"], f"group {group!r} must be on consecutive steps")
            groups_done.add(group)
        pivot = False
        if "pivot" in table:
            if not isinstance(table["pivot"], bool):
                raise check.fail([*path, "pivot"], "must be true or false")
            pivot = table["pivot"]
        if pivot:
            if pivot_at is not None:
                raise check.fail([*path, "pivot"], "only one step can be the pivot")
            if group is not None:
                raise check.fail([*path, "pivot"], "the pivot cannot be in a parallel group")
            pivot_at = index
        retriable = pivot_at is not None and not pivot
        if compensate is not None and (pivot or retriable):
            raise check.fail(
                [*path, "compensate"],
                "never run: the pivot and the steps after it are retried until they"
                " succeed, never compensated",
            )
        line = locate(text, path)
        steps.append(Step(name_, action, compensate, group, pivot, retriable, line))
    return Plan(name, tuple(steps), source)


def load(path: str | Path) -> Plan:
    """Read and check the saga file at *path*."""
    file = Path(path)
    try:
        with open(file, "rb") as fh:
            raw = fh.read(MAX_FILE + 1)
    except OSError as exc:
        raise SagaFileError(f"{path}: {exc.strerror or exc}") from None
    if len(raw) > MAX_FILE:
        raise SagaFileError(f"{path}: larger than {MAX_FILE} bytes")
    try:
        text = raw.decode()
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise SagaFileError(f"{path}:{line}: not valid UTF-8 (TOML files are UTF-8)") from None
    return parse(text, str(path))


# -- the template -------------------------------------------------------------------------

_TEMPLATE_DATA: dict[str, Any] = {
    "name": "order",
    "timeout": 30,
    "retry": {"attempts": 3, "backoff": 0.5, "jitter": 0.5},
    "step": [
        {"name": "reserve-stock", "run": "./reserve.sh", "compensate": "./release.sh"},
        {
            "name": "charge",
            "run": "./charge.sh",
            "compensate": {"run": "./refund.sh", "retry": {"attempts": 10}},
            "timeout": 10,
        },
        {"name": "confirm", "run": "./confirm.sh", "pivot": True},
        {"name": "ship", "group": "after", "run": "./ship.sh"},
        {"name": "notify", "group": "after", "publish": "orders.confirmed"},
    ],
}

_TEMPLATE_COMMENTS: dict[str, list[str]] = {
    "head": [
        "# A saga for eda-txn: steps run in order; when one fails for good, the steps",
        "# that completed are compensated in reverse order.",
        "#",
        "# Every action gets the saga data as JSON on stdin and EDA_SAGA_ID, EDA_STEP,",
        "# EDA_ATTEMPT (and EDA_SAGA_PHASE: action or compensate) in its environment:",
        "# use them as idempotency keys, as a step can run again after a crash.",
        "# A step that prints a JSON object on stdout adds its keys to the data.",
        "#",
        "# Run:  eda-txn saga THIS.toml --data '{\"order\": 7}'",
        "# Check: eda-txn saga --dry-run THIS.toml",
        "",
        "# name: shown by eda-txn status. timeout: default seconds per action.",
        "# retry: default tries; backoff doubles after each failure, jitter (0..1)",
        "# cuts each delay by up to that fraction, at random.",
    ],
    "reserve-stock": [
        "# run: a shell command (sh -c, in the directory eda-txn started in);",
        "# compensate: a command (or { run / call / publish = ... }) undoing it.",
    ],
    "charge": [
        "# call = 'service' would send the data to an eda-lb service instead;",
        "# per-step timeout and retry override the defaults above.",
    ],
    "confirm": [
        "# pivot: the point of no return. The steps after it are retried until",
        "# they succeed and never compensated (so they have no compensate).",
    ],
    "ship": [
        "# Consecutive steps with the same group run in parallel.",
    ],
    "notify": [
        "# publish: the saga data as one eda event on this topic.",
    ],
}


def template() -> str:
    """A commented saga file; the data comes from tomli-w, the comments are added around it."""
    import tomli_w

    text = tomli_w.dumps(_TEMPLATE_DATA)
    out: list[str] = list(_TEMPLATE_COMMENTS["head"])
    pending_step = False
    for line in text.splitlines():
        if line.strip() == "[[step]]":
            pending_step = True
            continue
        if pending_step:
            match = re.match(r'name = "(.*)"', line)
            if match:
                out.extend(_TEMPLATE_COMMENTS.get(match.group(1), []))
            out.append("[[step]]")
            pending_step = False
        out.append(line)
    return "\n".join(out).rstrip() + "\n"
