"""A persistent participant agent (eda-txn participant --persistent): what its failures
say, and the README's own agent run as written.  No sockets: the agent's pipes only."""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path

from eda.core.txn.actions import Call, PersistentAgent
from tests.helpers import wait_until

README = Path(__file__).resolve().parent.parent / "README.md"


def _agent(tmp_path: Path, source: str, timeout: float = 10.0) -> PersistentAgent:
    script = tmp_path / "agent.py"
    script.write_text(source)
    agent = PersistentAgent("pay", [sys.executable, str(script)], timeout=timeout)
    agent.start()
    return agent


def test_an_agent_that_crashes_is_reported_with_its_status_and_stderr(tmp_path: Path) -> None:
    agent = _agent(
        tmp_path,
        "import json, sys\n"
        "for line in sys.stdin:\n"
        "    req = json.loads(line)\n"
        "    amount = req['data']['amount']\n"  # KeyError: 'amount'
        "    print(json.dumps({'vote': 'yes'}), flush=True)\n",
    )
    try:
        result = agent.run(Call("prepare", "c1.00000000000000001", {"order": 7}, 1))
        assert not result.ok
        assert result.reason.startswith("the agent ended: exit status 1: "), result.reason
        assert result.reason.endswith("KeyError: 'amount'"), result.reason
        assert "did not answer" not in result.reason
        # restarted: a good request is served by the new process
        assert agent.run(Call("prepare", "c1.00000000000000002", {"amount": 3}, 1)).ok
    finally:
        agent.close()


def test_an_agent_killed_by_a_signal_says_so_and_a_silent_one_is_a_timeout(
    tmp_path: Path,
) -> None:
    agent = _agent(
        tmp_path,
        "import json, os, signal, sys\n"
        "for line in sys.stdin:\n"
        "    if json.loads(line)['data'].get('die'):\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n",
        timeout=0.5,
    )
    try:
        killed = agent.run(Call("prepare", "c1.00000000000000001", {"die": 1}, 1))
        assert killed.reason == "the agent ended: killed by signal 9", killed.reason
        silent = agent.run(Call("prepare", "c1.00000000000000002", {}, 1))
        assert silent.reason == "the agent did not answer within 0.5s", silent.reason
    finally:
        agent.close()


def _readme_pay_agent() -> str:
    text = README.read_text()
    found = re.search(r"cat > pay-agent <<'EOF'\n(.*?)\nEOF\n", text, re.S)
    assert found, "the README's pay-agent is gone"
    return found.group(1) + "\n"


def _readme_commit_data() -> list[dict[str, object]]:
    """The --data of every `eda-txn commit --participants stock,pay` line in the README."""
    import json

    datas = []
    for line in README.read_text().splitlines():
        if "eda-txn commit --participants stock,pay" in line:
            words = shlex.split(line.split("$ ", 1)[-1].split("#")[0].split(";")[0])
            datas.append(json.loads(words[words.index("--data") + 1]))
    assert len(datas) >= 4
    return datas


def test_the_readme_pay_agent_runs_as_written_on_the_readme_orders(tmp_path: Path) -> None:
    agent = _agent(tmp_path, _readme_pay_agent())
    try:
        for n, data in enumerate(_readme_commit_data()):
            txn = f"c1.{n:017x}"
            vote = agent.run(Call("prepare", txn, data, 1))
            assert vote.reason != "" or vote.ok, data
            assert "agent exited" not in vote.reason and "did not answer" not in vote.reason
            assert vote.ok == (float(data["amount"]) <= 100), (data, vote)  # type: ignore[arg-type]
            assert agent.run(Call("commit" if vote.ok else "abort", txn, data, 1)).ok
        no_amount = agent.run(Call("prepare", "c1.00000000000000099", {"order": 1}, 1))
        assert (no_amount.ok, no_amount.reason) == (False, "no amount to pay")
        assert agent.restarts == 0
    finally:
        agent.close()


def test_a_silent_agent_is_asked_to_stop_before_it_is_killed(tmp_path: Path) -> None:
    """An agent silent past the timeout is restarted: SIGTERM first (it may clean up),
    SIGKILL only after a grace; it used to be killed outright."""
    flag = tmp_path / "cleaned"
    ready = tmp_path / "ready"
    agent = _agent(
        tmp_path,
        "import signal, sys, time\n"
        f"signal.signal(signal.SIGTERM, lambda *_: (open({str(flag)!r}, 'w'), sys.exit(0)))\n"
        f"open({str(ready)!r}, 'w').close()\n"
        "while True:\n"
        "    time.sleep(1)\n",
        timeout=0.5,
    )
    try:
        # its SIGTERM handler is in place (a loaded machine can take longer than the
        # 0.5 s timeout just to start Python: a SIGTERM before it would kill it outright)
        wait_until(ready.exists, 60, "the agent to install its SIGTERM handler")
        silent = agent.run(Call("prepare", "c1.00000000000000001", {}, 1))
        assert silent.reason == "the agent did not answer within 0.5s", silent.reason
        assert flag.exists()
    finally:
        agent.close()
