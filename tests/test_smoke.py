import json

from tests.helpers import run


def test_one_event_reaches_running_subscriber(procs):
    sub = procs.sub_ready("orders.>", "-C", "1")
    result = run("eda-pub", "orders.created", "hello")
    assert result.returncode == 0, result.stderr
    assert sub.wait() == 0
    event = json.loads(sub.lines()[0])
    assert event["type"] == "orders.created"
    assert event["data"] == "hello"
