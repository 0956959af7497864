"""The txn workload: a bank on three eda-txn participants, two coordinators, and sagas.

**Transfers (2PC).** Each participant holds one account, kept in files its
shell commands update (``bank.sh``): a prepare records the transfer as held
(a debit only if the balance covers it: otherwise it votes no), a commit
moves the record to ``done``, an abort removes it. Each change is one atomic
rename or unlink under ``flock``, so a participant killed mid-command leaves
its account before or after the change, never between. The balance is the
initial amount plus the ``done`` records. Clients ``eda-txn commit`` random
transfers between two accounts, each client through its own coordinator.

**Sagas.** ``eda-txn saga`` of three steps: ``debit`` and ``credit`` are
``call`` steps to an eda-lb service whose workers run on the participants'
hosts, each action and compensation leaving a marker file named by its
request id (``SAGA.STEP.PHASE.0``: the same for every try, so idempotent);
``check`` is a local step that fails every third saga at its one try,
which is then compensated. A saga left stuck (a compensation out of tries) is resumed
after the recovery window.

The final reads record every account's files and every saga's markers; the
checker (:func:`tests.nemesis.checkers.check_txn`) judges them.
"""

from __future__ import annotations

import contextlib
import json
import random
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.helpers import PROGRAMS, wait_until
from tests.hosts import Host
from tests.nemesis.history import FAIL, INFO, OK, History
from tests.nemesis.workloads import Loop, Workload, attempt, json_lines, last_line

PROGRAMS.setdefault("eda-txn", "eda.cli.txn")
PROGRAMS.setdefault("eda-lb", "eda.cli.lb")
INITIAL = 300  # each account's opening balance
SAGA_SERVICE = "nemsaga"

BANK = r"""#!/bin/sh
# bank.sh PHASE: one account per participant, in $BANK_DIR/$EDA_PARTICIPANT;
# the transfer {"ref", "from", "to", "amount"} is JSON on stdin
dir="$BANK_DIR/$EDA_PARTICIPANT" t="$EDA_TXN_ID"
exec 9>"$dir/lock" && flock 9 || exit 1
case "$1" in
prepare)
  { [ -e "$dir/held/$t" ] || [ -e "$dir/done/$t" ]; } && exit 0
  set -- $(jq -r '"\(.ref) \(.from) \(.to) \(.amount)"')
  delta=$4
  if [ "$EDA_PARTICIPANT" = "$2" ]; then
    delta=-$4
    # what it has, less the debits that prepared transfers hold
    have=$(cat "$dir/initial" "$dir"/done/* 2>/dev/null | awk '{ s += $1 } END { print s }')
    held=$(cat "$dir"/held/* 2>/dev/null | awk '$1 < 0 { s += $1 } END { print s + 0 }')
    [ $((have + held - $4)) -ge 0 ] || { echo "balance $((have + held)) < $4"; exit 1; }
  fi
  echo "$delta $1" > "$dir/held/.$t" && mv "$dir/held/.$t" "$dir/held/$t" ;;
commit)
  [ -e "$dir/held/$t" ] && mv "$dir/held/$t" "$dir/done/$t" ;;
abort)
  rm -f "$dir/held/$t" ;;
esac
exit 0
"""

SAGA = """name = "nemsaga"
timeout = 8
retry = {{ attempts = 40, backoff = 0.2, max_backoff = 2, jitter = 0.5 }}

[[step]]
name = "debit"
call = "{service}"
compensate = {{ call = "{service}" }}

[[step]]
name = "credit"
call = "{service}"
compensate = {{ call = "{service}" }}

[[step]]
name = "check"
run = "jq -e '.n % 3 != 0' > /dev/null"
retry = {{ attempts = 1 }}
"""
SAGA_STEPS = ("debit", "credit")  # the steps with effects; "check" has none


class TxnWorkload(Workload):
    """Participants acct1..3 on *participants*, coordinators on *coordinators*, transfer
    clients (one per coordinator) and saga clients on *clients*; saga workers on the
    participants' hosts."""

    subject = "txn"

    def __init__(
        self,
        history: History,
        workdir: Path,
        participants: list[Host],
        coordinators: list[Host],
        clients: list[Host],
    ) -> None:
        super().__init__(history, workdir)
        self.bank = workdir / "bank"
        self.effects = workdir / "saga-effects"
        self.effects.mkdir(parents=True, exist_ok=True)
        script = workdir / "bank.sh"
        script.write_text(BANK)
        script.chmod(0o755)
        self.accounts = [f"acct{i}" for i in range(1, len(participants) + 1)]
        bank = str(script)
        for name, host in zip(self.accounts, participants, strict=True):
            for sub in ("held", "done"):
                (self.bank / name / sub).mkdir(parents=True, exist_ok=True)
            (self.bank / name / "initial").write_text(f"{INITIAL}\n")
            proc = host.eda(
                "eda-txn", "participant", name, "-v", "--log", str(workdir / f"txn-{name}"),
                "--inquire-after", "1", "--action-timeout", "10",
                "--prepare", f"{bank} prepare", "--commit", f"{bank} commit",
                "--abort", f"{bank} abort", env={"BANK_DIR": str(self.bank)},
            )  # fmt: skip
            self.daemon(name, host, proc, ("kill", "stop"))
        self.coordinators = []
        for i, host in enumerate(coordinators, 1):
            proc = host.eda(
                "eda-txn", "coordinator", "-v", "--name", f"c{i}",
                "--log", str(workdir / f"txn-c{i}"), "--vote-timeout", "3",
            )  # fmt: skip
            self.daemon(f"c{i}", host, proc, ("kill", "stop"))
            self.coordinators.append(f"tcp://{host.address}:7730")
        reply = f'cat > /dev/null; touch {self.effects}/"$EDA_REQUEST_ID"; echo ok'
        for i, host in enumerate(participants, 1):
            proc = host.eda(
                "eda-lb", "worker", SAGA_SERVICE, "-v", "--heartbeat", "0.3",
                "--id", f"sagaw{i}", "--", "sh", "-c", reply,
            )  # fmt: skip
            self.daemon(f"sagaw{i}", host, proc, ("kill", "stop"))
        self.saga_file = workdir / "nemsaga.toml"
        self.saga_file.write_text(SAGA.format(service=SAGA_SERVICE))
        history.add("txn", self.subject, "setup", {"accounts": self.accounts, "initial": INITIAL})
        for i, coordinator in enumerate(self.coordinators, 1):
            host = clients[(i - 1) % len(clients)]
            name = f"transfer{i}"
            self.loops.append(Loop(history, name, self._transfers(name, host, coordinator, i)))
        self.sagas: dict[str, Host] = {}
        self.saga_lock = threading.Lock()
        for i, host in enumerate(clients[:1], 1):
            name = f"saga{i}"
            self.loops.append(Loop(history, name, self._sagas(name, host), pause=0.2))

    def ready(self) -> None:
        for d in self.daemons:
            d.proc.wait_stderr("listening on|serving", 60)

    # -- 2PC transfers ------------------------------------------------------------------------
    def _transfers(
        self, name: str, host: Host, coordinator: str, seed: int
    ) -> Callable[[], None]:
        rng = random.Random(seed)
        count = iter(range(1, 1 << 30))

        def transfer() -> None:
            n = next(count)
            source, target = rng.sample(self.accounts, 2)
            data = {"ref": f"{name}-{n}", "from": source, "to": target,
                    "amount": rng.randint(1, 120)}  # fmt: skip
            began = self.history.now()
            rc, out, err = attempt(
                host, "eda-txn", "commit", "-p", f"{source},{target}", "--data",
                json.dumps(data), "--coordinator", coordinator, "--timeout", "3", "--wait", "10",
                timeout=60,
            )  # fmt: skip
            result = next(iter(json_lines(out)), {})
            value = {**data, "rc": rc, "txn": result.get("txn"), "outcome": result.get("outcome"),
                     "stderr": last_line(err)}  # fmt: skip
            # 0 committed, 5 aborted; anything else: the outcome is not known here
            outcome = OK if rc in (0, 5) else INFO
            self.history.add(name, self.subject, "transfer", value, outcome, began)

        return transfer

    # -- sagas ----------------------------------------------------------------------------------
    def _sagas(self, name: str, host: Host) -> Callable[[], None]:
        count = iter(range(1, 1 << 30))

        def saga() -> None:
            n = next(count)
            sid = f"{name}-{n}"
            with self.saga_lock:
                self.sagas[sid] = host
            began = self.history.now()
            rc, _, err = attempt(
                host, "eda-txn", "saga", str(self.saga_file), "--id", sid, "--data",
                json.dumps({"n": n}), "--log", str(self.workdir / "sagas"), timeout=120,
            )  # fmt: skip
            value = {"saga": sid, "n": n, "rc": rc, "stderr": last_line(err)}
            self.history.add(name, self.subject, "saga", value, OK if rc in (0, 5) else INFO, began)

        return saga

    # -- after the recovery window -------------------------------------------------------------
    def _held(self) -> int:
        return sum(len(list((self.bank / a / "held").iterdir())) for a in self.accounts)

    def finish(self) -> None:
        began = self.history.now()
        for sid, host in sorted(self.sagas.items()):  # a stuck or cut-short saga goes on
            last = [op for op in self.history.ops if op.kind == "saga" and op.value["saga"] == sid]
            if last and last[-1].value["rc"] in (0, 5):
                continue
            rc, _, err = attempt(
                host, "eda-txn", "saga", "--resume", sid, "--log", str(self.workdir / "sagas"),
                timeout=120,
            )  # fmt: skip
            value = {"saga": sid, "rc": rc, "stderr": last_line(err)}
            self.history.add("saga-resume", self.subject, "saga", value,
                             OK if rc in (0, 5) else FAIL, began)  # fmt: skip
        # participants in doubt ask their coordinator, running again since the heal; what
        # is still held after that, the checker names
        with contextlib.suppress(AssertionError):
            wait_until(lambda: self._held() == 0, 60, "no transfer held in doubt")
        for account in self.accounts:
            records: dict[str, dict[str, Any]] = {"held": {}, "done": {}}
            for state in ("held", "done"):
                for f in sorted((self.bank / account / state).iterdir()):
                    if f.name.startswith("."):
                        continue
                    delta, _, ref = f.read_text().strip().partition(" ")
                    records[state][f.name] = {"delta": int(delta), "ref": ref}
            value = {"account": account, "initial": INITIAL, **records}
            self.history.add(account, self.subject, "account", value, OK, began)
        markers = sorted(p.name for p in self.effects.iterdir())
        self.history.add("saga-effects", self.subject, "effects", markers, OK, began)
