"""The secure bus's ACL (eda-bus serve --secure --acl FILE): who may publish, subscribe
and administer, by the key the CURVE handshake proved; real processes in the test
namespace, and the rules themselves (patterns within patterns, the file's checks).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import pytest
import zmq
from hypothesis import given
from hypothesis import strategies as st

from eda.core import keys
from eda.core.bus import protocol
from eda.core.bus.acl import Acl, Forbidden
from eda.core.errors import ConfigError
from eda.core.topics import Matcher, covers
from tests.helpers import Identity, Proc, Procs, run, together, wait_until

SERVING = r"serving .+ on (tcp://\S+) \(seq"
RIGHTS = """\
[alice]
publish = ["orders.>"]
subscribe = ["orders.>"]

[ops]
subscribe = [">"]
admin = true

[default]
publish = ["public.>"]
subscribe = ["public.>"]
"""


@pytest.fixture
def ids(tmp_path: Path) -> dict[str, Identity]:
    """The bus trusts alice, bob and ops (bob has no table of his own); they trust it."""
    people = {name: Identity(tmp_path / name) for name in ("bus", "alice", "bob", "ops")}
    for name in ("alice", "bob", "ops"):
        people["bus"].trust(name, people[name])
        people[name].trust("bus", people["bus"])
    return people


def serve(procs: Procs, tmp_path: Path, ids: dict[str, Identity], acl: str) -> tuple[Proc, str]:
    """A secure bus with the ACL *acl* in tmp_path/acl.toml; its endpoint."""
    (tmp_path / "acl.toml").write_text(acl)
    bus = procs.eda(
        "eda-bus", "serve", "--secure", "--acl", str(tmp_path / "acl.toml"), "--no-mdns", "-v",
        "--data", str(tmp_path / "data"), "--bind", "tcp://127.0.0.1:0", env=ids["bus"].env,
    )  # fmt: skip
    return bus, bus.wait_stderr(SERVING, 30)[1]


def as_(who: Identity, program: str, endpoint: str, *args: str, input: str | None = None):  # type: ignore[no-untyped-def]
    """*program* --secure --bus bus@ENDPOINT *args*, as *who*."""
    flags = ("--confirm",) if program == "eda-pub" else ()
    if program == "eda-bus":
        args, flags = args[1:], (args[0],)  # the subcommand first
    return run(program, *flags, "--secure", "--bus", f"bus@{endpoint}", *args, input=input,
               env=who.env)  # fmt: skip


def stats(endpoint: str, who: Identity) -> dict[str, object]:
    done = as_(who, "eda-bus", endpoint, "stats", "--json")
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    return next(r for r in rows if r["kind"] == "bus")


def topics(endpoint: str, who: Identity) -> set[str]:
    done = as_(who, "eda-bus", endpoint, "stats", "--json")
    assert done.returncode == 0, done.stderr
    return {r["topic"] for r in map(json.loads, done.stdout.splitlines()) if r["kind"] == "topic"}


def one_error(result, program: str) -> str:  # type: ignore[no-untyped-def]
    """The one error line of a refused run (exit 1)."""
    lines = result.stderr.splitlines()
    assert result.returncode == 1 and len(lines) == 1, result.stderr
    assert lines[0].startswith(f"{program}: error: ")
    return str(lines[0])


def rewrite(path: Path, text: str) -> None:
    """Replace *path* whole, as an editor saves it (the bus never reads half of it)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def envelope(topic: str, data: str, n: int) -> str:
    event = {"specversion": "1.0", "id": f"e{n}", "source": "test", "type": topic, "data": data}
    return json.dumps(event) + "\n"


@pytest.mark.long
def test_a_key_allowed_orders_cannot_publish_or_subscribe_to_payments(procs: Procs, tmp_path, ids):
    _, ep = serve(procs, tmp_path, ids, RIGHTS)
    alice, bob, ops = ids["alice"], ids["bob"], ids["ops"]
    # what no later check depends on runs at once (each run waits on its own answers)
    refused_subs = (
        (("payments.x",), "payments.x"),
        ((">",), ">"),
        (("--durable", "pay", "payments.>"), "payments.>"),
        (("--group", "workers", "payments.x"), "payments.x"),
        (("orders.>", "*.x"), "*.x"),
    )
    allowed, refused, by_bob, made, *subs = together(
        lambda: as_(alice, "eda-pub", ep, "orders.created", "one"),
        lambda: as_(alice, "eda-pub", ep, "payments.x", "SECRET"),
        lambda: as_(bob, "eda-pub", ep, "orders.x", "no"),
        # a durable of ops on '>' (it takes the first event: alice's orders.created)
        lambda: as_(ops, "eda-sub", ep, "--durable", "audit", ">", "-C", "1", "--raw"),
        *(lambda a=args: as_(alice, "eda-sub", ep, *a, "--from-start", "-W", "20")
          for args, _ in refused_subs),
    )  # fmt: skip
    assert (allowed.returncode, allowed.stderr) == (0, "")
    refused = one_error(refused, "eda-pub")
    assert refused.startswith("eda-pub: error: the bus refused payments.x ")
    assert refused.endswith("alice may not publish to payments.x (the bus's ACL)")
    # bob has no table: [default] gives him public.> only
    bob_refused = one_error(by_bob, "eda-pub")
    assert bob_refused.endswith("bob may not publish to orders.x (the bus's ACL)")
    assert made.returncode == 0, made.stderr
    # subscribing: payments.x, '>', a durable or a group on it are not within orders.>
    for sub, (_, pattern) in zip(subs, refused_subs, strict=True):
        line = one_error(sub, "eda-sub")
        assert line == (f"eda-sub: error: the bus refused: alice may not subscribe to {pattern}"
                        " (the bus's ACL)")  # fmt: skip
    assert stats(ep, ops)["events"] == 1  # nothing of the refused batches was stored
    # one input, both topics: the allowed batches are confirmed and stored, the others
    # refused with one line whatever their number
    lines = [envelope("orders.paid" if n % 2 else "payments.x", f"m{n}", n) for n in range(400)]
    mixed = as_(alice, "eda-pub", ep, "--envelope", input="".join(lines))
    assert "payments.x" in one_error(mixed, "eda-pub")
    counted, listed = together(lambda: stats(ep, ops), lambda: topics(ep, ops))
    assert counted["events"] == 201
    assert listed == {"orders.created", "orders.paid"}

    def bob_then_alice() -> tuple[Any, Any, Any]:
        news = as_(bob, "eda-pub", ep, "public.news", "hi")
        # once public.news is stored: bob reads it; stats shows alice only what she may
        # subscribe to (not public.news)
        heard, seen = together(
            lambda: as_(bob, "eda-sub", ep, "public.>", "--from-start", "-C", "1", "--raw"),
            lambda: topics(ep, alice),
        )
        return news, heard, seen

    sub, takeover, (news, heard, seen), retain = together(
        # subscribing within orders.> is accepted
        lambda: as_(alice, "eda-sub", ep, "orders.*", "--from-start", "-C", "2", "--raw"),
        # taking over a durable consumer needs the rights on the patterns it had (its position)
        lambda: as_(alice, "eda-sub", ep, "--durable", "audit", "orders.>", "-W", "20"),
        bob_then_alice,
        # retain needs admin
        lambda: as_(alice, "eda-bus", ep, "retain", "--max-age", "1d"),
    )
    assert (sub.returncode, sub.stdout.splitlines()) == (0, ["one", "m1"]), sub.stderr
    line = one_error(takeover, "eda-sub")
    assert line.endswith("alice may not subscribe to > (the bus's ACL)")
    assert news.returncode == 0, news.stderr
    assert (heard.returncode, heard.stdout) == (0, "hi\n"), heard.stderr
    assert seen == {"orders.created", "orders.paid"}
    assert "alice may not retain: it needs admin = true" in one_error(retain, "eda-bus")
    assert as_(ops, "eda-bus", ep, "retain", "--max-age", "1d").returncode == 0


def test_editing_the_acl_narrows_rights_without_a_restart(procs: Procs, tmp_path, ids):
    bus, ep = serve(procs, tmp_path, ids, '[alice]\npublish = [">"]\nsubscribe = [">"]\n')
    alice, acl = ids["alice"], tmp_path / "acl.toml"
    running = procs.eda("eda-sub", "--secure", "--bus", f"bus@{ep}", "--raw", "payments.>",
                        env=alice.env)  # fmt: skip
    wait_until(lambda: as_(alice, "eda-pub", ep, "payments.x", "before").returncode == 0
               and running.lines(), 30, "the subscription running")  # fmt: skip
    rewrite(acl, '[alice]\npublish = ["orders.>"]\nsubscribe = ["orders.>"]\n')
    bus.wait_stderr("ACL file .+ read again", 15)
    assert running.wait(20) == 1  # a subscription no longer allowed ends, told why
    assert running.stderr.splitlines() == [
        "eda-sub: error: the bus refused: alice may not subscribe to payments.> (the bus's ACL)"
    ]
    line = one_error(as_(alice, "eda-pub", ep, "payments.x", "after"), "eda-pub")
    assert line.endswith("alice may not publish to payments.x (the bus's ACL)")
    line = one_error(as_(alice, "eda-sub", ep, "payments.x", "--from-start", "-W", "20"), "eda-sub")
    assert "alice may not subscribe to payments.x" in line
    assert as_(alice, "eda-pub", ep, "orders.x", "still").returncode == 0
    # a malformed edit: one warning, and the rights read before stay
    rewrite(acl, '[alice]\npublish = ">"\n')
    bus.wait_stderr(rf"warning: ACL file {re.escape(str(acl))}:1: .*publish must be a list"
                    ".*; keeping the rights read before", 15)  # fmt: skip
    assert as_(alice, "eda-pub", ep, "orders.x", "kept").returncode == 0
    assert as_(alice, "eda-pub", ep, "payments.x", "kept").returncode == 1
    # revoking alice's key: her rights go with it (no restart either)
    ids["bus"].revoke("alice")
    refused = as_(alice, "eda-pub", ep, "orders.x", "revoked")
    assert refused.returncode == 1 and "does not trust this key" in refused.stderr
    assert bus.popen.poll() is None


def test_a_malformed_acl_file_stops_the_bus_at_start_with_one_line_naming_it(tmp_path, ids):
    acl = tmp_path / "acl.toml"
    acl.write_text('[alice]\npublish = ["orders/#"]\n')
    done = run("eda-bus", "serve", "--secure", "--acl", str(acl), "--no-mdns", "--data",
               str(tmp_path / "data"), "--bind", "tcp://127.0.0.1:0", env=ids["bus"].env)  # fmt: skip
    lines = done.stderr.splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert lines[0].startswith(f"eda-bus: error: ACL file {acl}:1: [alice] publish: ")
    assert "'orders.>'" in lines[0]  # the MQTT hint of topic patterns


def test_acl_without_secure_is_a_usage_error_from_a_flag_a_variable_or_the_config(tmp_path):
    acl = tmp_path / "acl.toml"
    acl.write_text('[alice]\npublish = [">"]\n')
    config = tmp_path / "eda.toml"
    config.write_text(f'[bus]\nacl = "{acl}"\n')
    base = ("eda-bus", "serve", "--no-mdns", "--data", str(tmp_path / "data"))
    for done in (
        run(*base, "--acl", str(acl)),
        run(*base, env={"EDA_BUS_ACL": str(acl)}),
        run(*base, "--config", str(config)),
    ):
        assert done.returncode == 2, done.stderr
        assert done.stderr.strip() == (
            "eda-bus: error: --acl is used with --secure (EDA_SECURE=1): its rights go to "
            "trusted keys"
        )


def test_the_name_is_the_one_the_handshake_proved_never_one_a_message_claims(
    procs: Procs, tmp_path, ids
):
    _, ep = serve(procs, tmp_path, ids, RIGHTS)
    bob = keys.load_identity(ids["bob"].home / "eda" / "keys" / "id.key")
    zctx = zmq.Context()
    sock = zctx.socket(zmq.DEALER)
    try:
        sock.linger = 0
        sock.curve_publickey, sock.curve_secretkey = bob.public, bob.secret
        sock.curve_serverkey = ids["bus"].public.encode()
        sock.connect(ep)
        claims = {"op": "sub", "patterns": ["orders.>"], "rid": 1, "name": "alice",
                  "key": ids["alice"].public, "user": "alice"}  # fmt: skip
        sock.send_multipart([protocol.REQUEST, json.dumps(claims).encode()])
        assert sock.poll(10_000)
        kind, body = sock.recv_multipart()
        assert kind == protocol.ANSWER
        reply = json.loads(body)
        assert not reply["ok"]
        assert reply["error"] == "bob may not subscribe to orders.> (the bus's ACL)"
    finally:
        sock.close()
        zctx.term()


# -- the rules, without processes -------------------------------------------------------

TOKENS = st.sampled_from(["a", "b", "*", ">"])
PATTERNS = (
    st.lists(TOKENS, min_size=1, max_size=4).filter(lambda t: ">" not in t[:-1]).map(".".join)
)
TOPICS = st.lists(st.sampled_from(["a", "b", "c"]), min_size=1, max_size=5).map(".".join)


@given(PATTERNS, PATTERNS, st.lists(TOPICS, max_size=30))
def test_a_pattern_within_another_matches_nothing_the_other_does_not(outer, pattern, topics):
    if covers(outer, pattern):
        wide, narrow = Matcher([outer]), Matcher([pattern])
        assert all(wide(t) for t in topics if narrow(t))


@pytest.mark.parametrize(
    ("outer", "pattern", "within"),
    [
        ("orders.>", "orders.x", True),
        ("orders.>", "orders.*.eu", True),
        ("orders.>", "orders.>", True),
        ("orders.>", "orders", False),
        ("orders.>", ">", False),
        ("orders.*", "orders.>", False),
        ("orders.*", "orders.x", True),
        ("orders.x", "orders.*", False),
        (">", "a.b.c", True),
        ("*.x", "a.x", True),
        ("a.b", "a.b.c", False),
    ],
)
def test_patterns_within_patterns(outer: str, pattern: str, within: bool) -> None:
    assert covers(outer, pattern) is within


def test_rights_by_name_default_and_nothing(tmp_path: Path) -> None:
    path = tmp_path / "acl.toml"
    path.write_text(RIGHTS)
    acl = Acl.load(path)
    acl.access("alice").publish("orders.new")
    acl.access("carol").publish("public.x")  # no table: [default]
    for who, topic in (("alice", "public.x"), ("carol", "orders.x"), (None, "public.x")):
        with pytest.raises(Forbidden):
            acl.access(who).publish(topic)
    acl.access("ops").administer("retain")
    with pytest.raises(Forbidden, match="a key no longer trusted may not subscribe"):
        acl.access(None).read(["public.x"])
    path.write_text('[alice]\npublish = [">"]\n')  # without [default], no table: nothing
    assert acl.changed()
    acl.reload()
    with pytest.raises(Forbidden, match="carol may not publish"):
        acl.access("carol").publish("public.x")
    assert acl.unknown(["bob"]) == ["alice"]


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("[alice\n", "ACL file {path}: "),
        ('[alice]\npublish = "orders.>"\n', "{path}:1: [alice] publish must be a list"),
        ('[alice]\npublsh = [">"]\n', "{path}:1: [alice] has an unknown key 'publsh'"),
        ('[alice.laptop]\npublish = [">"]\n', '(a name with a dot is quoted: ["alice.laptop"])'),
        ('[alice]\npublish = ["a..b"]\n', "{path}:1: [alice] publish: invalid pattern"),
        ("[alice]\nadmin = 1\n", "[alice] admin must be true or false"),
        ('alice = ">"\n', "'alice' must be a table"),
        ('["-x"]\npublish = [">"]\n', "[-x] is not a trusted key name"),
    ],
)
def test_a_malformed_acl_is_a_config_error_naming_the_file(
    tmp_path: Path, text: str, says: str
) -> None:
    path = tmp_path / "acl.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        Acl.load(path)
    assert says.format(path=path) in str(err.value)
    assert str(path) in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="not found"):
        Acl.load(tmp_path / "missing.toml")


def test_eda_pub_says_each_reason_for_refused_batches_once() -> None:
    from eda.cli.pub import _refusals
    from eda.core.bus.publisher import Unconfirmed

    why = "alice may not publish to payments.x (the bus's ACL)"
    refused = [(Unconfirmed("payments.x", 1 + 10 * i, 10, "p1"), why) for i in range(300)]
    refused.append((Unconfirmed("big.x", 1, 1, "p1"), "event too large\x1b[31m"))
    assert _refusals(refused) == [
        f"the bus refused 300 batches (3000 events) of payments.x: {why}",
        "the bus refused big.x p1-1 (1 event(s)): event too large\\x1b[31m",
    ]
