"""Publisher and subscribers on different hosts joined by a bridge."""

import json


def test_publisher_reaches_subscribers_on_two_other_hosts(network):
    a, b, c = (network.add_host(n) for n in "abc")
    sub_b = b.sub_ready("orders.>", "-C", "2")
    sub_c = c.sub_ready("orders.*", "-C", "2")
    result = a.run("eda-pub", "orders.created", "one", "two")
    assert result.returncode == 0, result.stderr
    assert sub_b.wait() == 0 and sub_c.wait() == 0
    for sub in (sub_b, sub_c):
        events = [json.loads(line) for line in sub.lines()]
        assert [e["data"] for e in events] == ["one", "two"]
        assert events[0]["source"].endswith(events[0]["id"].rsplit("-", 1)[0])
