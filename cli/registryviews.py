"""How eda-registry prints what it finds: the fields a --format template may use,
the tables (instances, services) and the terminal lines (changes, browsed services);
every string a peer sent is escaped (:func:`~eda.cli.output.for_terminal`)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from eda.cli.common import Context
from eda.cli.output import Column, Output, TableView, for_terminal

if TYPE_CHECKING:
    from rich.text import Text


INSTANCE_FIELDS = (
    "service", "id", "host", "port", "address", "weight", "meta", "status", "ttl", "interval",
    "registered", "heartbeat", "registry", "rev", "key",
)  # fmt: skip
EVENT_FIELDS = (
    *INSTANCE_FIELDS, "type", "reason", "time", "seq", "instance", "snapshot", "resync",
)  # fmt: skip
BROWSE_FIELDS = (
    "event", "name", "type", "domain", "host", "addresses", "address", "port", "txt", "meta",
    "time",
)  # fmt: skip


SERVICE_FIELDS = ("service", "instances", "passing")


def _services_cells(item: dict[str, Any]) -> list[Any]:
    """A service with failing instances shows its count in colour."""
    from rich.text import Text

    passing, total = item["passing"], item["instances"]
    style = "green" if passing == total else "yellow" if passing else "red"
    return [item["service"], str(total), Text(f"{passing}/{total}", style=style)]


SERVICES_TABLE = TableView(
    (
        Column("SERVICE", wrap=True),
        Column("INSTANCES", numeric=True),
        Column("PASSING", numeric=True),
    ),
    _services_cells,
)


def _fields(record: dict[str, Any]) -> dict[str, Any]:
    fields = dict(record)
    fields["address"] = _address(record.get("host"), record.get("port"))
    return fields


def _address(host: object, port: object) -> str:
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"


def instance_output(ctx: Context, template: str | None, force_json: bool) -> Output:
    """How instances print; a --format naming an unknown field is refused at once."""
    return Output(
        ctx,
        template=template,
        fields=INSTANCE_FIELDS,
        force_json=force_json,
        template_fields=_fields,
    )


def print_instances(found: list[dict[str, Any]], out: Output) -> None:
    """One table of them all on a terminal, else one item each."""
    out.table(found, INSTANCES_TABLE)


STATUS_COLOURS = {"passing": "green", "warning": "yellow", "critical": "red"}


def passing(found: list[dict[str, Any]]) -> str:
    """How many instances pass their checks (list --watch's heading)."""
    ok = sum(1 for r in found if r.get("status") == "passing")
    return f"{ok}/{len(found)} passing"


def _instance_cells(r: dict[str, Any]) -> list[Any]:
    """An instance's cells; every peer-supplied string is escaped and shown as plain Text."""
    from rich.text import Text

    status = for_terminal(r.get("status"))
    beat = r.get("heartbeat")
    seen = f"{time.time() - beat:.1f}s ago" if isinstance(beat, (int, float)) and beat else "-"
    meta = r.get("meta")
    meta = meta if isinstance(meta, dict) else {}
    return [
        r.get("service"),
        r.get("id"),
        f"{r.get('host')}:{r.get('port')}",
        Text(status, style=STATUS_COLOURS.get(status, "")),
        r.get("weight"),
        " ".join(for_terminal(f"{k}={v}") for k, v in meta.items()),
        seen,
    ]


# an address, an id or a service name is never cut (a cut address is a wrong
# address): the least needed columns go first, and a terminal too narrow for
# the others gets one block per instance
INSTANCES_TABLE = TableView(
    (
        Column("SERVICE"),
        Column("INSTANCE"),
        Column("ADDRESS"),
        Column("STATUS", priority=1),
        Column("WEIGHT", priority=4, numeric=True),
        Column("META", priority=2, wrap=True),
        Column("LAST SEEN", priority=3),
    ),
    _instance_cells,
)


EVENT_COLOURS = {
    "registered": "green",
    "deregistered": "yellow",
    "expired": "red",
    "health": "magenta",
}


def event_output(
    ctx: Context, exec_cmd: str | None, template: str | None, force_json: bool
) -> Output:
    return Output(
        ctx,
        template=template,
        fields=EVENT_FIELDS,
        force_json=force_json,
        exec_cmd=exec_cmd,
        exec_env=_event_env,
        template_fields=_event_fields,
        terminal=lambda event: event_line(event, EVENT_COLOURS),
    )


def _event_env(event: dict[str, Any]) -> dict[str, Any]:
    inst = event.get("instance") or {}
    return {
        "EDA_EVENT": event.get("type"),
        "EDA_SERVICE": event.get("service"),
        "EDA_INSTANCE": inst.get("id"),
        "EDA_EVENT_ID": event.get("id"),
    }


def event_line(event: dict[str, Any], colours: dict[str, str]) -> Any:
    """One change as rich Text: peer strings escaped, never read as markup."""
    from rich.text import Text

    inst = event.get("instance")
    inst = inst if isinstance(inst, dict) else {}
    kind = for_terminal(event.get("type"))
    line = Text()
    line.append(for_terminal(str(event.get("time", ""))[11:23]), style="dim")
    line.append(" ")
    line.append(f"{kind:<12}", style=colours.get(kind, "cyan"))
    line.append(
        " "
        + for_terminal(
            f"{inst.get('service')}/{inst.get('id')} {inst.get('host')}:{inst.get('port')} "
            f"{inst.get('status')}"
        )
    )
    line.append("  " + for_terminal(event.get("reason", "")), style="dim")
    return line


def _event_fields(event: dict[str, Any]) -> dict[str, Any]:
    fields = _fields(event["instance"])
    fields.update({k: v for k, v in event.items() if k != "instance"})
    fields["instance"] = event["instance"].get("id")
    return fields


def browse_fields(item: dict[str, Any]) -> dict[str, Any]:
    fields = dict(item)
    addresses = item.get("addresses") or []
    fields["address"] = _address(addresses[0], item.get("port")) if addresses else ""
    fields["meta"] = item.get("txt") or {}  # a TXT record is a service's metadata
    return fields


def browse_line(item: dict[str, Any]) -> Text:
    """One browse item for a terminal: best address first, TXT as key=value, all escaped."""
    addresses = item.get("addresses") or []
    where = f"{addresses[0]}:{item.get('port', '')}" if addresses else ""
    others = f" (also {', '.join(addresses[1:])})" if len(addresses) > 1 else ""
    txt = " ".join(f"{k}={v}" for k, v in (item.get("txt") or {}).items())
    from rich.text import Text

    return Text(for_terminal(f"{item['event']:<8} {item['name']}  {where}{others}  {txt}".rstrip()))
